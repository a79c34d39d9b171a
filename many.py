"""`lorasched merge-many`: every row of a manifest merged, in parallel, with a summary table.

A manifest is a CSV with the columns `subject`, `style`, `method`, `options` (extra `lorasched merge` options, as
on the command line) and `output`, and optionally `base` (else `--base`). Rows run in a local process pool
(`--jobs N`) or, under `accelerate launch`, shared among the launched processes (each on its own device). A row
whose output exists and was made from the same input files with the same method is skipped; a row that fails
gets its one-line error in the summary while the others run.
"""

from __future__ import annotations

import csv
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from .distributed import Group
from .merge import fileformat
from .merge.errors import LoraschedError
from .merge.lora_io import file_sha256

COLUMNS = ("subject", "style", "method", "options", "output")


@dataclass(frozen=True)
class Row:
    index: int  # 1-based, as a spreadsheet shows the data rows
    base: str
    subject: str
    style: str
    method: str
    options: str
    output: str

    def merge_args(self) -> list[str]:
        """The row as `lorasched merge` arguments."""
        try:
            extra = shlex.split(self.options)
        except ValueError as exc:
            raise LoraschedError(f"options {self.options!r}: {exc}") from None
        return ["--base", self.base, "--subject", self.subject, "--style", self.style, "--method", self.method,
                *extra, "--output", self.output]


@dataclass(frozen=True)
class Outcome:
    row: int
    output: str
    seconds: float
    status: str  # `wrote …`, `up to date`, or `error: …`

    @property
    def failed(self) -> bool:
        return self.status.startswith("error")


def read_manifest(path: str | Path, base: str | None) -> list[Row]:
    """The rows of a manifest; a missing column or base is one line naming the manifest."""
    try:
        with open(path, newline="") as handle:
            records = list(csv.DictReader(handle))
            header = records[0].keys() if records else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LoraschedError(f"{path}: not a readable CSV manifest ({exc})") from None
    missing = [column for column in COLUMNS if column not in header]
    if not records or missing:
        raise LoraschedError(f"{path}: a manifest needs a header with {', '.join(COLUMNS)} and at least one row"
                             + (f" (missing: {', '.join(missing)})" if missing else ""))
    rows = []
    for index, record in enumerate(records, start=1):
        row_base = (record.get("base") or "").strip() or base
        if not row_base:
            raise LoraschedError(f"{path}: row {index} names no base; give --base or a base column")
        rows.append(Row(index, row_base, *((record[c] or "").strip() for c in COLUMNS)))
    return rows


def up_to_date(row: Row) -> bool:
    """Whether the row's output exists and was made from the same input files with the same method."""
    output = Path(row.output)
    if not output.is_file() or not fileformat.is_scheduled(output):
        return False
    try:
        scheduled = fileformat.read(output)
        return scheduled.method == row.method and [source.sha256 for source in scheduled.sources] == \
            [file_sha256(path) for path in (row.subject, row.style)]
    except (LoraschedError, OSError):
        return False


def run_rows(rows: list[Row], worker: Callable[[Row], Outcome], jobs: int, group: Group) -> list[Outcome] | None:
    """Every row through `worker` (a picklable function): this process's share under a launcher, else `jobs`
    local processes. The main process gets every outcome in row order; the others get None."""
    mine = group.share(rows)
    if jobs > 1 and len(mine) > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            outcomes = list(pool.map(worker, mine))
    else:
        outcomes = [worker(row) for row in mine]
    gathered = [outcome for part in group.gather(outcomes) for outcome in part]
    return sorted(gathered, key=lambda outcome: outcome.row) if group.is_main else None


def timed(row: Row, merge: Callable[[Row], str]) -> Outcome:
    """Run one row; skipped when up to date; any `LoraschedError` becomes the row's status line."""
    start = time.perf_counter()
    try:
        status = "up to date" if up_to_date(row) else merge(row)
    except LoraschedError as exc:
        status = f"error: {exc}"
    return Outcome(row.index, row.output, time.perf_counter() - start, status)


def table(outcomes: list[Outcome]) -> list[str]:
    width = max([len("output")] + [len(outcome.output) for outcome in outcomes])
    lines = [f"{'row':>4}  {'output':<{width}}  {'seconds':>8}  status"]
    for outcome in outcomes:
        lines.append(f"{outcome.row:>4}  {outcome.output:<{width}}  {outcome.seconds:>8.1f}  {outcome.status}")
    failed = sum(outcome.failed for outcome in outcomes)
    lines.append(f"{len(outcomes)} rows: {len(outcomes) - failed} done, {failed} failed")
    return lines
