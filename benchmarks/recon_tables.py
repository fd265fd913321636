"""Print the reconstruction benchmark (benchmarks/recon_metrics.json) as Markdown tables for RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    m = json.loads((HERE / "recon_metrics.json").read_text())
    for kind, res in m.items():
        s = res["summary_snr_gt_10"]
        print(
            f"\n**{kind}** ({res['n']} held-out stamps, amortised {res['per_stamp_ms']:.1f} ms/stamp): "
            f"S/N > 10 (n = {s['n']}): median Δ|e| = {s['median_de']:+.4f}, "
            f"median Δmag_r = {s['median_dmag_r']:+.4f}\n"
        )
        for key, d in res["bins"].items():
            print(f"| {key} | n | median Δ\\|e\\| | Δ\\|e\\| ±1σ | median Δmag_r | Δmag_r ±1σ |")
            print("|---|---|---|---|---|---|")
            for a, b in zip(d["e"], d["mag"], strict=True):
                if a["n"] < 5:
                    continue
                lo = next(v for k, v in a.items() if k.endswith("_lo"))
                hi = next(v for k, v in a.items() if k.endswith("_hi"))
                e_rng = f"[{a['p16']:+.3f}, {a['p84']:+.3f}]"
                m_rng = f"[{b['p16']:+.3f}, {b['p84']:+.3f}]"
                cells = [f"{lo:g}–{hi:g}", str(int(a["n"])), f"{a['median']:+.4f}", e_rng]
                cells += [f"{b['median']:+.4f}", m_rng]
                print("| " + " | ".join(cells) + " |")
            print()


if __name__ == "__main__":
    main()
