"""A benchmark's results: printed as a table, saved as JSON, drawn as a PNG.

Every benchmark prints ratios against a baseline timed in the same run and the fraction of the
physical floor; this module only presents what the benchmark computed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--json PATH`` and ``--plot PATH`` to a benchmark's parser."""
    parser.add_argument("--json", metavar="PATH", help="write every measured row and the run's settings as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the main figure to a PNG (needs matplotlib)")


def environment() -> dict[str, Any]:
    """Versions and device of this run, stored beside the numbers."""
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpus"] = torch.cuda.device_count()
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


@dataclass
class Report:
    """Rows of one benchmark run. ``columns`` maps each row key to its printed header."""

    title: str
    columns: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def print(self, console: Console | None = None) -> None:
        table = Table(title=self.title, title_justify="left")
        for header in self.columns.values():
            table.add_column(header, justify="right")
        for row in self.rows:
            table.add_row(*(_format(row.get(key)) for key in self.columns))
        # Piped output (logs, CI) would otherwise be cut to 80 columns.
        console = console or Console(width=None if sys.stdout.isatty() else 240)
        console.print(table)
        for note in self.notes:
            console.print(note)

    def save_json(self, path: str | Path) -> None:
        payload = {"title": self.title, "environment": environment(), "settings": self.settings,
                   "columns": self.columns, "rows": self.rows, "notes": self.notes}
        Path(path).write_text(json.dumps(payload, indent=2, default=str))

    def save_plot(self, path: str | Path, x: str, series: Sequence[str], *, group: str | None = None,
                  ylabel: str = "", logx: bool = True) -> None:
        """Draws ``series`` (row keys) against ``x``, one line per value of ``group`` if given."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise RuntimeError("--plot needs matplotlib: pip install 'moekit[plot]'") from exc
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = sorted({r.get(group) for r in self.rows}, key=str) if group else [None]
        for g in groups:
            rows = [r for r in self.rows if group is None or r.get(group) == g]
            for key in series:
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts))
                label = self.columns.get(key, key) + (f" ({g})" if group else "")
                ax.plot(xs, ys, marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(self.columns.get(x, x))
        ax.set_ylabel(ylabel)
        ax.set_title(self.title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def finish(self, args: argparse.Namespace, **plot_kwargs: Any) -> None:
        """Prints the table, then writes the outputs that ``add_output_args`` asked for."""
        self.print()
        if getattr(args, "json", None):
            self.save_json(args.json)
        if getattr(args, "plot", None):
            self.save_plot(args.plot, **plot_kwargs)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.3g}"
        return f"{value:.2f}"
    return str(value)
