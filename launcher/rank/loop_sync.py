"""What the ranks agree on inside the training loop, and when the host reads it.

Each step the loop needs three things from the other ranks: the step's loss (for the watchdog
and the metrics line), the tokens trained (metrics line, checkpoints) and whether any rank was
asked to stop (a signal, RUN_DIR/STOP). Reading a reduced value on the host waits for the
device's queue to drain (a host synchronisation), so each is read only where it is needed:

- With the loss watchdog on (train.watchdog.nan, the default, or a max_loss), each step's agreed
  loss must be known before that step's update is applied: one blocking all-reduce a step, after
  the backward passes, which carries the tokens and the stop votes too. A stop is honoured at the
  step boundary where it is seen.
- With the watchdog off (nan: false, max_loss: null) nothing is read per step. The tokens are
  counted on each rank and summed, together with the loss of the step that is logged, once per
  metrics line (train.log_every), and before a checkpoint and at the end. The stop votes are
  host numbers summed on a gloo group (collectives.all_reduce_start): the vote of step N starts
  after its update and is read after step N+1's, so it never waits on the device. A stop asked
  during step N is honoured at the end of step N+1: one step later than with the watchdog on.

Values only the metrics line shows (a preference objective's reward sums, `extra`) ride on the
same reduce, on the steps that write a line; their means divide by the micro batches summed in it.

    sync = StepSync(s, stop)                  # s: launcher.rank.train.Setup
    signalled, stop_file = sync.first_votes()  # before the first step (blocking, once)
    loss, tokens, votes, extra = sync.agree(loss_sum, accum, n_tokens, log_due, extra)  # after
                                              # the backward; extra: a preference objective's metric sums
    signalled, stop_file = sync.stop_votes(votes)                          # after the update
    tokens = sync.flush()                     # before a checkpoint / the end: tokens counted
    sync.close()                              # a vote still under way is waited for
"""
from __future__ import annotations

from typing import Any, Optional

from launcher.rank import collectives
from launcher.config.schema import WatchdogConfig

Votes = tuple[float, float]  # (ranks signalled, ranks that saw RUN_DIR/STOP)


def watchdog_on(w: WatchdogConfig) -> bool:
    """Whether the watchdog needs every step's loss before the update."""
    return w.nan or w.max_loss is not None


class StepSync:
    """The loop's collectives; see the module docstring for when each runs."""

    def __init__(self, s: Any, stop: Any):
        self.s, self.stop = s, stop
        self.blocking = watchdog_on(s.cfg.train.watchdog)
        self.unreduced = 0.0            # this rank's tokens not yet summed over the ranks
        self.pending: Optional[collectives.Pending] = None
        self.kept: dict[int, Any] = {}  # the reduce buffers on the device, by length: made once

    def _votes(self) -> list[float]:
        return self.stop.votes(self.s.cfg.run_dir, self.s.env.is_main)

    def first_votes(self) -> Votes:
        signalled, stop_file = collectives.all_reduce_sum(self._votes(), self.s.device)
        return signalled, stop_file

    def agree(self, loss_sum: Any, accum: int, n_tokens: float, log_due: bool,
              extra: list[Any] = ()) -> tuple[Optional[float], float, Optional[Votes],
                                              Optional[list[float]]]:
        """After a step's backward passes: (the step's mean loss over the ranks, or None where
        nothing needs it; the tokens summed over the ranks, 0 while they are still counted
        locally; this step's stop votes, None where they travel on their own; the means of
        `extra` over the ranks' micro batches, None where no metrics line is due)."""
        self.unreduced += n_tokens
        if not self.blocking and not log_due:
            return None, 0.0, None, None
        votes = self._votes() if self.blocking else []
        extra = list(extra) if log_due else []
        values = [loss_sum, float(accum), self.unreduced] + votes + extra
        loss, micro, tokens, *rest = collectives.all_reduce_sum(values, self.s.device,
                                                                self._buffer(len(values)))
        self.unreduced = 0.0
        got, sums = rest[:len(votes)], rest[len(votes):]
        return (loss / micro, tokens, (got[0], got[1]) if got else None,
                [v / micro for v in sums] if log_due else None)

    def _buffer(self, n: int) -> Any:
        if n not in self.kept:
            import torch
            self.kept[n] = torch.zeros(n, dtype=torch.float64, device=self.s.device)
        return self.kept[n]

    def stop_votes(self, votes: Optional[Votes]) -> Votes:
        """After the update: the stop votes to act on now (this step's with the watchdog on, the
        previous step's otherwise, when the next vote is started)."""
        if votes is not None:
            return votes
        got = self.pending.wait() if self.pending is not None else [0.0, 0.0]
        self.pending = None
        if not any(got):
            self.pending = collectives.all_reduce_start(self._votes())
        return got[0], got[1]

    def flush(self) -> float:
        """The tokens counted locally since the last sum, summed over the ranks now (collective
        where the watchdog is off, nothing to do where it is on)."""
        if self.blocking:
            return 0.0
        (tokens,) = collectives.all_reduce_sum([self.unreduced], self.s.device)
        self.unreduced = 0.0
        return tokens

    def close(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
