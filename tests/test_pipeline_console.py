"""The quiet console of local pipeline runs: one line per step on screen, every byte in the log file."""

from __future__ import annotations

import io
import logging
import sys

from pipelines.console import StepConsole

CYAN, GREEN, RED, END = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def test_steps_become_one_line_each_and_everything_goes_to_the_log(tmp_path):
    screen = io.StringIO()
    console = StepConsole(tmp_path / "logs" / "run.log", screen=screen)
    with console.capture():
        logging.getLogger("kfp").warning("Task curate cache hit (key=abc); skipping execution.")
        print(f"12:00:00.000 - INFO - Executing task {CYAN}'prepare'{END}")
        print('    {"executor": "json", "noise": 1}')
        sys.stderr.write("a third-party notice on stderr\n")
        print(f"12:00:01.000 - INFO - Task {CYAN}'prepare'{END} finished with status {GREEN}SUCCESS{END}")
        print(f"12:00:02.000 - INFO - Executing task {CYAN}'train-adapter'{END}")
        print("    step 1/2 loss 0.5")
        print(f"12:00:03.000 - INFO - Task {CYAN}'train-adapter'{END} finished with status {RED}FAILURE{END}")
    lines = screen.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].split()[:3] == ["ok", "curate", "cached"]
    assert lines[1].split()[:2] == ["ok", "prepare"] and lines[1].endswith(" s")
    assert lines[2].split()[:2] == ["FAILED", "train-adapter"]
    assert [(s.task, s.status, s.cached) for s in console.steps] == [
        ("curate", "SUCCESS", True), ("prepare", "SUCCESS", False), ("train-adapter", "FAILURE", False)]
    log = (tmp_path / "logs" / "run.log").read_text()
    for text in ('"executor": "json"', "a third-party notice on stderr", "cache hit", "step 1/2 loss 0.5"):
        assert text in log
    assert "executor" not in screen.getvalue()
    # the failing step's own lines, not the earlier steps'
    tail = "\n".join(console.failure_tail())
    assert "step 1/2 loss 0.5" in tail and "executor" not in tail
    # streams and handlers are restored
    assert sys.stdout is not console and not any(getattr(h, "stream", None).__class__.__name__ == "_Tee"
                                                  for h in logging.getLogger().handlers)


def test_the_torchvision_fallback_notice_is_dropped_where_it_is_logged_and_nothing_else():
    from idforge.logs import quiet_known_notices

    quiet_known_notices()
    quiet_known_notices()  # idempotent
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) == 1
    notice = logging.LogRecord(logger.name, logging.WARNING, __file__, 1,
                               "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                               "`CLIPImageProcessorPil` for backward compatibility.", None, None)
    other = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "something else went wrong", None, None)
    assert not logger.filter(notice) and logger.filter(other)


def test_make_tiny_prints_no_torchvision_notice(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "from idforge.diffusion.tiny import make_tiny; import sys; "
                          f"make_tiny({str(tmp_path / 'clip')!r}, kind='clip')"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torchvision" not in res.stderr + res.stdout
