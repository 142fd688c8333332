"""What every command shares: the stderr console and error handling.

stdout carries data only; everything meant for a person (progress, summaries,
warnings, errors) goes to stderr through :data:`err_console`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from imgrank.errors import ImgrankError, ModelError

if TYPE_CHECKING:
    from rich.progress import Progress

    from imgrank.ranking import SkippedFile
    from imgrank.sorter import SortCallbacks

F = TypeVar("F", bound=Callable[..., Any])

#: Console for people: progress, summaries, warnings, errors. Never stdout.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exit code for Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    """Print one error line to stderr (escaped so file names with [brackets] show as is)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}")


def warn(message: str, *, quiet: bool = False) -> None:
    """Print one warning line to stderr unless ``quiet``."""
    if quiet:
        return
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/] {escape(message)}")


#: What to install when an optional heavy dependency is missing.
_MISSING_MODULE_HINTS = {
    "torch": "install PyTorch (pip install torch torchvision), or sort with "
    "--runtime onnx --onnx DIR using a model exported by `imgrank export`",
    "torchvision": "pip install torchvision (open_clip needs it)",
    "open_clip": "pip install open_clip_torch",
    "onnxruntime": "pip install 'imgrank[onnx]' (or 'imgrank[gpu]' on an NVIDIA machine)",
    "onnx": "pip install 'imgrank[onnx]'",
    "tokenizers": "pip install 'imgrank[onnx]'",
    "lxml": "pip install lxml (imgrank reads and writes XMP sidecars with it)",
}


def handle_errors(func: F) -> F:
    """Turn library errors into one message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImgrankError as exc:
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            hint = _MISSING_MODULE_HINTS.get((exc.name or "").split(".")[0])
            if hint is None:
                raise
            error(f"{exc.name} is not installed: {hint}")
            raise typer.Exit(ModelError.exit_code) from None
        except KeyboardInterrupt:
            interrupted_message()
            _exit_now_if_decoding()
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # `imgrank runs | head` closes our stdout early; that is not an error. (Commands
            # with side effects write through StdoutSink, so those happen regardless.)
            _detach_stdout()
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


class StdoutSink:
    """stdout for data, whose reader may go away without stopping the command's side effects.

    ``sort ... --rename --apply | head -1`` closes the pipe after one line; the
    renames, links and copies must still happen (they do not depend on who
    reads stdout), so a failed write is recorded instead of ending the run.
    A closed pipe is not an error (the quiet exit of ``| head`` stays); any
    other failure (``> /dev/full``) is reported by :meth:`finish` after the
    side effects are done.
    """

    def __init__(self) -> None:
        self.closed = False
        self.failure: OSError | None = None

    def write(self, produce: Callable[[BinaryIO], None]) -> None:
        """Call ``produce(stream)`` on stdout's bytes and flush; nothing once stdout failed."""
        if self.closed or self.failure is not None:
            return
        try:
            produce(sys.stdout.buffer)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            self.closed = True
            _detach_stdout()
        except OSError as exc:
            self.failure = exc
            _detach_stdout()

    def finish(self, what: str = "the output") -> None:
        """Raise the stdout failure, if any, as one message (after the side effects).

        Raises:
            ImgrankError: stdout could not be written for another reason than a closed pipe.
        """
        if self.failure is not None:
            exc = self.failure
            raise ImgrankError(f"cannot write {what} to stdout: {exc.strerror or exc}")


def _detach_stdout() -> None:
    """Point file descriptor 1 at /dev/null so Python's final flush cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (tests capture stdout): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def route_library_warnings(*, quiet: bool) -> None:
    """Python warnings of libraries (Pillow, numpy) as one ``warning:`` line; none with --quiet.

    Left alone they reach stderr in Python's two-line format with a source line,
    even under ``-q``, which promises nothing on stderr but errors. (The CLI may
    change process-wide state; library code never does.)
    """
    import warnings

    if quiet:
        warnings.simplefilter("ignore")
        return

    def show(message: Any, category: Any, filename: str, lineno: int, *_rest: Any) -> None:
        warn(str(message))

    warnings.showwarning = show


#: What the running command has already changed on disk, for an exact message if a
#: Ctrl-C ends it later (e.g. "renamed 6 photo(s) (run ...)"). CLI state, not library state.
done_so_far: list[str] = []
#: Whether :func:`interrupted_message` has spoken (so the entry point does not repeat it).
interrupt_reported = False


def interrupted_message() -> None:
    """Say that Ctrl-C ended the command, what it had already done, and what is left to do."""
    global interrupt_reported
    interrupt_reported = True
    message = "interrupted"
    if done_so_far:
        message += "; already done: " + "; ".join(done_so_far)
    try:
        from imgrank.files.journal import unfinished_runs

        unfinished = unfinished_runs()
    except Exception:  # the message must come out whatever the journals look like
        unfinished = []
    if unfinished:
        message += (
            f"; rename run {unfinished[0].run_id} was left unfinished: run `imgrank recover` "
            "to give every photo its original name (or `imgrank recover --forward`)"
        )
    error(message)


class InterruptGuard:
    """Hold Ctrl-C off while files are renamed: noted, then acted on at a safe point.

    A KeyboardInterrupt can land on any bytecode, e.g. between the last rename and
    the journal's closing record. Inside the guard SIGINT only sets
    :attr:`requested`; the code polls it (``guard()``) where stopping is clean.
    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _note(self, _signum: int, _frame: object) -> None:
        self.requested = True

    def __enter__(self) -> InterruptGuard:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _exit_now_if_decoding() -> None:
    """After Ctrl-C, leave at once if a decode thread is still busy with one file.

    Python joins worker threads at exit, and decoding one huge or hostile file
    can take minutes; the first Ctrl-C must stop the run within a second. By
    now every ``finally`` has run (journals closed, the cache flushed, partial
    files removed); only the abandoned decodes remain, and they write nothing.
    """
    stream_module = sys.modules.get("imgrank.features.stream")
    if stream_module is None or stream_module.decodes_running() == 0:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


def option_given(ctx: typer.Context, parameter: str) -> bool:
    """Whether the user set an option (command line or environment), not Typer's default.

    Commands that take their backbone from a model folder use this to tell
    "the user asked for this model" from "this is the default model".
    """
    source = ctx.get_parameter_source(parameter)
    return source is not None and source.name != "DEFAULT"


def prepare_torch() -> None:
    """Process-wide torch settings for a command-line run; the library never sets them.

    The model gets one intra-op thread per available core (the container's
    share, not the host's), set before any tensor work so the pool starts at
    that size; see :func:`imgrank.models.device.cpu_threads_for_model` for
    the measurement. Called by the commands that may run the torch model.

    It does not import torch (a second of start-up a run on onnxruntime, or one
    served from the cache, never pays): when torch is not loaded yet, the count
    goes to ``OMP_NUM_THREADS``, which torch reads when it starts its pool; a
    count the user set there is kept.
    """
    from imgrank.models.device import cpu_threads_for_model

    threads = cpu_threads_for_model()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def progress_bar(*, enabled: bool) -> Progress | None:
    """A Rich progress bar with images/s and ETA on stderr, or None when not wanted."""
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task):  # type: ignore[no-untyped-def]
            speed = task.speed
            return Text("" if speed is None else f"{speed:.1f} img/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


@dataclass
class RunFeedback:
    """What ``sort``, ``cull`` and ``embed`` show while photos are read and scored.

    Attributes:
        callbacks: For the library (:class:`imgrank.sorter.SortCallbacks`).
        skipped: Every file that could not be used, in order (for ``--errors``).
        progress: The progress bar, or None (not a terminal, ``--quiet``, or not asked);
            the command starts and stops it around the run.
    """

    callbacks: SortCallbacks
    skipped: list[SkippedFile]
    progress: Progress | None


def run_feedback(*, quiet: bool, task: str | None = None) -> RunFeedback:
    """Warnings, news, skipped files (shown even with ``--quiet``: each is an error for that
    file) and, with ``task`` on a terminal, a progress bar of that name."""
    from imgrank.sorter import SortCallbacks

    skipped: list[SkippedFile] = []

    def skip(item: SkippedFile) -> None:
        skipped.append(item)
        err_console.print(f"[yellow]skipped:[/] {escape(str(item.path))}: {escape(item.reason)}")

    progress = progress_bar(enabled=task is not None and err_console.is_terminal and not quiet)
    task_ids: list[Any] = []

    def found(total: int) -> None:
        if progress is not None:
            task_ids.append(progress.add_task(str(task), total=total))

    def advance(count: int) -> None:
        if progress is not None and task_ids:
            progress.advance(task_ids[0], count)

    callbacks = SortCallbacks(
        warn=lambda message: warn(message, quiet=quiet),
        skip=skip,
        found=found,
        advance=advance,
        notice=lambda message: notice(message, quiet=quiet),
    )
    return RunFeedback(callbacks, skipped, progress)


def notice(message: str, *, quiet: bool = False) -> None:
    """Print one line of news (not a problem) to stderr unless ``quiet``."""
    if quiet:
        return
    from rich.markup import escape

    err_console.print(f"[cyan]imgrank:[/] {escape(message)}")


def check_before_writing() -> None:
    """The unfinished-run guard: every command that writes files calls it first.

    Raises:
        UnfinishedRunError: an interrupted rename run must be recovered first.
    """
    from imgrank.files.journal import check_no_unfinished_run

    check_no_unfinished_run()

