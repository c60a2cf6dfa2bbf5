"""`make demo`: classify the bundled samples with the shipped model (64 images: in-process, no Ray start).

Lays the 64 bundled images out as two "slides" (as a lab's export would be),
runs the real classify pipeline, and prints the per-slide differential,
where the results and heatmaps are, writes the HTML report and says how to
open the review app on the results.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pbc"
DEMO_ROOT = REPO / "demo-output"


def stage_input(dest: Path) -> int:
    """Copy the samples into two slide folders, alternating images between them."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    for folder in sorted(p for p in SAMPLES.iterdir() if p.is_dir()):
        for i, img in enumerate(sorted(folder.iterdir())):
            slide = dest / ("slide-A" if i % 2 == 0 else "slide-B")
            slide.mkdir(parents=True, exist_ok=True)
            shutil.copy(img, slide / img.name)
            n += 1
    return n


def main() -> int:
    """Run the demo end to end and print a summary."""
    from wbc_batch.cli import main as cli_main

    input_dir = DEMO_ROOT / "input"
    output_dir = DEMO_ROOT / "results"
    n = stage_input(input_dir)
    print(f"demo: classifying {n} bundled PBC images (CC BY 4.0, see samples/ATTRIBUTION.md) with the shipped model")
    code = cli_main(["classify", str(input_dir), str(output_dir), "--run-id", "demo"])
    if code != 0:
        return code
    try:
        from wbc_batch.query import differential

        print("\nper-slide white-cell differential:")
        table = differential(str(output_dir))
        shown = ["sample_id", "white_cells", "cell_class", "count", "percent", "ci_low", "ci_high", "reference",
                 "flag", "needs_review", "reliable"]
        print(table[[c for c in shown if c in table.columns]].to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    except ImportError:
        pass
    print(f"\nParquet results: {output_dir / 'predictions'}")
    print(f"heatmaps:        {output_dir / 'heatmaps'}")
    print(f"run manifest:    {output_dir / 'runs' / 'demo.json'}")
    print(f"query further:   .venv/bin/wbc-batch query {output_dir} --differential")
    from wbc_batch.report import write_report

    print(f"HTML report:     {write_report(str(output_dir))}")
    print(f"\nreview and sign off the cells in a browser:\n  .venv/bin/wbc-batch review {output_dir}\n"
          "  then open the http://127.0.0.1:8765/?token=... link it prints (this machine only; Ctrl+C stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
