"""One look for every progress bar: description, bar, done/total, time left."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn


def progress_bar(show: bool = True) -> Progress:
    """A rich progress display (a context manager); ``show=False`` keeps tests quiet."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not show,
        transient=True,
    )
