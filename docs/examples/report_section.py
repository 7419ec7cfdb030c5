"""A report section: candidates evaluated and failed in each generation, as an HTML table."""

from evomerge.run import Run


def section_generations(run: Run) -> str:
    """The search's generations: candidates evaluated, failed, and stopped by racing."""
    return run.history[["generation", "evaluated", "failed", "raced"]].to_html(index=False)


def generations(run: Run, status: str) -> list[tuple[str, str, str, list]]:
    """The section as the page lists it: (anchor, heading, html, plotly figures); none before a search."""
    if not len(run.history):
        return []
    return [("generations", "Generations", section_generations(run), [])]
