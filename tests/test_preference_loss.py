"""The preference losses against the published formulas, computed by hand in Python floats
(fp32 tensors, 1e-5), and against TRL's implementation where TRL is installed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from launcher.rank import preference  # noqa: E402
from launcher.data.chat import IGNORE  # noqa: E402

# two pairs: policy and reference summed log-probs, token counts of each answer
PC, PR = [-4.0, -7.5], [-6.0, -5.0]
RC, RR = [-5.0, -6.5], [-5.5, -6.0]
NC, NR = [4, 5], [3, 6]


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def t32(xs):
    return torch.tensor(xs, dtype=torch.float32)


def cfg(objective, **kw):
    base = {"objective": objective, "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
            "orpo_lambda": 0.1, "reference": "model"}
    return SimpleNamespace(**{**base, **kw})


def batch_loss(t, ref=True):
    logps, counts = t32(PC + PR), torch.tensor(NC + NR)
    return preference.pair_loss(t, logps, counts, t32(RC + RR) if ref else None)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_equals_formula(smoothing):
    beta = 0.3
    want, acc = [], []
    for i in range(2):
        z = (PC[i] - PR[i]) - (RC[i] - RR[i])
        want.append(-lsig(beta * z) * (1 - smoothing) - lsig(-beta * z) * smoothing)
        acc.append(beta * (PC[i] - RC[i]) > beta * (PR[i] - RR[i]))
    loss, m = batch_loss(cfg("dpo", beta=beta, label_smoothing=smoothing))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-5)
    wc = sum(beta * (PC[i] - RC[i]) for i in range(2)) / 2
    wr = sum(beta * (PR[i] - RR[i]) for i in range(2)) / 2
    assert float(m["rewards_chosen"]) == pytest.approx(wc, abs=1e-5)
    assert float(m["rewards_rejected"]) == pytest.approx(wr, abs=1e-5)
    assert float(m["reward_margin"]) == pytest.approx(wc - wr, abs=1e-5)
    assert float(m["reward_accuracy"]) == pytest.approx(sum(acc) / 2)


def test_ipo_equals_formula_on_mean_logps():
    beta = 0.25
    want = []
    for i in range(2):
        z = (PC[i] / NC[i] - PR[i] / NR[i]) - (RC[i] / NC[i] - RR[i] / NR[i])
        want.append((z - 1 / (2 * beta)) ** 2)
    loss, _ = batch_loss(cfg("ipo", beta=beta))
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-5)


def test_simpo_equals_formula_without_reference():
    beta, gamma, e = 2.0, 0.7, 0.1
    want = []
    for i in range(2):
        z = beta * (PC[i] / NC[i] - PR[i] / NR[i]) - gamma
        want.append(-lsig(z) * (1 - e) - lsig(-z) * e)
    loss, m = batch_loss(cfg("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=e), ref=False)
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-5)
    assert float(m["rewards_chosen"]) == pytest.approx(beta * (PC[0] / 4 + PC[1] / 5) / 2, abs=1e-5)


def test_orpo_equals_formula_without_reference():
    lam = 0.2
    nll = -(PC[0] + PC[1]) / (NC[0] + NC[1])
    want = []
    for i in range(2):
        pc, pr = PC[i] / NC[i], PR[i] / NR[i]
        log_odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
        want.append(nll - lam * lsig(log_odds))
    loss, _ = batch_loss(cfg("orpo", orpo_lambda=lam), ref=False)
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-5)


def test_sequence_logps_counts_answer_tokens_only():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 2, 1]])  # position 1 predicts 2, position 2 predicts 1
    lp, n = preference.sequence_logps(logits, labels)
    want = (3.0 - math.log(math.exp(0) + math.exp(-1) + math.exp(3))) + (2.0 - math.log(3 * math.exp(2)))
    assert int(n[0]) == 2
    assert float(lp[0]) == pytest.approx(want, abs=1e-5)


def test_equal_policy_and_reference_give_ln2():
    logps, counts = t32(PC + PR), torch.tensor(NC + NR)
    loss, m = preference.pair_loss(cfg("dpo"), logps, counts, logps.clone())
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m["reward_accuracy"]) == 0.0  # ties are not wins


# ------------------------------------------------------------------ TRL (a test dependency)
class _Acc:
    device = "cpu"

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_dpo(loss_type: str, beta: float) -> tuple[float, dict]:
    """TRL's DPOTrainer._compute_loss on the same pairs: a stand-in model returns per-token
    log-probs whose sums over each answer are PC/PR, the reference's precomputed (RC/RR)."""
    from collections import defaultdict

    from trl import DPOTrainer
    width = max(NC + NR) + 1
    b = len(PC)
    per_token = torch.zeros((2 * b, width - 1))
    completion = torch.zeros((2 * b, width), dtype=torch.long)
    for row, (total, n) in enumerate(zip(PC + PR, NC + NR)):
        per_token[row, :n] = total / n
        completion[row, 1:n + 1] = 1
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token),
                          is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = lambda **kw: out  # noqa: E731
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Acc(),
                           aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                           f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros((2 * b, width), dtype=torch.long),
              "attention_mask": torch.ones((2 * b, width), dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": t32(RC),
              "ref_rejected_logps": t32(RR)}
    loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("objective,trl_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_match_trl(objective, trl_type):
    beta = 0.3
    want, logged = _trl_dpo(trl_type, beta)
    loss, m = batch_loss(cfg(objective, beta=beta))
    assert float(loss) == pytest.approx(want, abs=1e-5)
    if objective == "dpo":  # TRL logs the summed log-ratio rewards (IPO's too)
        assert float(m["rewards_chosen"]) == pytest.approx(logged["rewards/chosen"], abs=1e-5)
        assert float(m["reward_margin"]) == pytest.approx(logged["rewards/margins"], abs=1e-5)
        assert float(m["reward_accuracy"]) == pytest.approx(logged["rewards/accuracies"])


def test_simpo_matches_trl_cpo():
    from trl.experimental.cpo import CPOTrainer
    beta, gamma, e = 2.0, 0.7, 0.1
    fake = SimpleNamespace(loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=e,
                           alpha=0.0, accelerator=_Acc())
    pc = t32([PC[i] / NC[i] for i in range(2)])
    pr = t32([PR[i] / NR[i] for i in range(2)])
    losses, wc, _ = CPOTrainer.cpo_loss(fake, pc, pr)
    loss, m = batch_loss(cfg("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=e), ref=False)
    assert float(loss) == pytest.approx(float(losses.mean()), abs=1e-5)
    assert float(m["rewards_chosen"]) == pytest.approx(float(wc.mean()), abs=1e-5)


def test_orpo_matches_trl():
    from trl.experimental.orpo import ORPOTrainer
    lam = 0.2
    fake = SimpleNamespace(beta=lam, accelerator=_Acc())
    pc = t32([PC[i] / NC[i] for i in range(2)])
    pr = t32([PR[i] / NR[i] for i in range(2)])
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, pc, pr)
    nll = -(PC[0] + PC[1]) / (NC[0] + NC[1])  # TRL: the chosen tokens' cross-entropy
    loss, _ = batch_loss(cfg("orpo", orpo_lambda=lam), ref=False)
    assert float(loss) == pytest.approx(nll - float(losses.mean()), abs=1e-5)
