"""Tables as CSV (for analysis) and Markdown (for reading)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _escape(v):
    return v.replace("|", "\\|") if isinstance(v, str) else v


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table, 4 significant digits, missing values as empty cells; a "|" in a name or
    cell (KL(target||latent)) escaped, as a GFM table needs (else the row splits there)."""
    esc = df.map(_escape).rename(columns=_escape)
    cells = esc.astype(object).where(esc.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="")


def write_table(df: pd.DataFrame, folder: Path, stem: str, title: str, intro: str) -> None:
    """`<stem>.csv` (for analysis) and `<stem>.md` (title, what the rows are, the table) in `folder`."""
    df.to_csv(folder / f"{stem}.csv", index=False, float_format="%.6g")
    md = [f"# {title}", "", intro, "", markdown(df), ""]
    (folder / f"{stem}.md").write_text("\n".join(md))
