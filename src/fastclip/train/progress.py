"""What a run prints: the progress bar (or plain lines when not on a terminal), the evaluation
line and the final summary."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line ``\\r`` bar on a TTY, or one plain line every ``every`` steps otherwise."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", stream=None, every: int = 10):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.total, self.start, self.mode, self.every = total, start, mode, max(1, every)
        self.t0, self._last_draw, self._line = time.time(), 0.0, ""

    def update(self, step: int, **stats: float) -> None:
        """``step`` = optimizer steps done so far (1-based)."""
        if self.mode == "none":
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"loss {stats['loss']:.3f}", f"scale {stats['scale']:.1f}"]
        if stats.get("bias") is not None:
            parts.append(f"bias {stats['bias']:.2f}")
        parts.append(f"{stats['images_per_s']:.0f} img/s")
        if self.mode == "bar":
            now = time.time()
            if now - self._last_draw < 0.1 and step < self.total:
                return
            self._last_draw = now
            width = 24
            fill = int(width * step / self.total)
            line = (f"\rstep {step}/{self.total} [{'#' * fill}{'.' * (width - fill)}] " + " | ".join(parts)
                    + f" | {fmt_time(elapsed)} ETA {fmt_time(eta)}")
            pad = max(0, len(self._line) - len(line))
            self.stream.write(line + " " * pad)
            self._line = line
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) " + " | ".join(parts)
                              + f" | elapsed {fmt_time(elapsed)} ETA {fmt_time(eta)}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print ``text`` on its own line without breaking the bar."""
        if self.mode == "bar" and self._line:
            self.stream.write("\n")
            self._line = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar" and self._line:
            self.stream.write("\n")
            self.stream.flush()


def format_eval(ev: Dict[str, float]) -> str:
    """One line of an evaluation row: zero-shot top-1 per task (with chance), val loss and recall."""
    tasks = []
    for k, v in ev.items():
        if k.startswith("zeroshot/") and k.endswith("/top1") and k != "zeroshot/mean_top1":
            name = k.split("/")[1]
            chance = ev.get(f"chance/{name}")
            tasks.append(f"{name} {100 * v:.1f}%" + (f" (chance {100 * chance:.1f}%)" if chance else ""))
    parts = ["zero-shot top-1 " + ", ".join(tasks)] if tasks else []
    if "val/loss" in ev:
        from ..eval.evaluate import single_pair_val_loss
        loss = f"n/a ({ev['val/n']} val pair{'s' if ev['val/n'] != 1 else ''})" if single_pair_val_loss(ev) \
            else f"{ev['val/loss']:.3f}"
        parts.append(f"val loss {loss}, val mean recall {100 * ev['val/mean_recall']:.1f}%")
    return f"eval @ step {ev['step']}: " + ("; ".join(parts) if parts else "nothing to evaluate")


def format_final(r: Dict[str, Any], out_dir: str) -> str:
    """The run's closing lines: steps and time, zero-shot top-1, skipped samples, files written."""
    lines = [f"done: {r['steps']} steps in {fmt_time(r['wall_time_s'])} ({r['wall_time_s']:.1f} s)"]
    zs = {k: v for k, v in r.items() if k.startswith("zero_shot_") and k != "zero_shot_top1_mean"}
    if zs:
        lines.append("zero-shot top-1: " + ", ".join(f"{k[len('zero_shot_'):-len('_top1')]} {100 * v:.1f}%"
                                                     for k, v in zs.items())
                     + (f", mean {100 * r['zero_shot_top1_mean']:.1f}%" if "zero_shot_top1_mean" in r else ""))
    if r.get("train_samples_skipped") or r.get("eval_samples_skipped"):
        batches = r.get("train_batches_skipped")
        lines.append(f"skipped (image missing or corrupt, or no caption): {r['train_samples_skipped']} training, "
                     f"{r['eval_samples_skipped']} evaluation samples"
                     + (f"; {batches} training batch{'es' if batches > 1 else ''} with too few loadable samples "
                        f"{'were' if batches > 1 else 'was'} replaced by the next" if batches else ""))
    lines.append(f"wrote {r['checkpoint']}, {os.path.join(out_dir, 'metrics.json')}"
                 + (f", {r['curves']}" if r.get("curves") else ""))
    return "\n".join(lines)
