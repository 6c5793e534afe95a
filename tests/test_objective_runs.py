"""Every objective in the module and in short trainings: which reference it gets, what it logs, and that each
configs/objective/*.yaml trains."""

import pytest
import torch
from omegaconf import OmegaConf

from src.errors import SettingError
from src.models.logprobs import answer_logprobs
from src.models.module import PreferenceModule
from tests.helpers import CONFIGS, run_entry
from tests.test_sft import batch
from tests.test_train import read_metrics

OBJECTIVE_CONFIGS = sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml"))
PAIR_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def module(objective, **reference):
    return PreferenceModule(
        model={"tiny": {"seed": 0}}, objective=objective, optim={"lr": 1e-2}, reference=reference or None
    )


def test_simpo_has_no_reference_and_logs_rewards():
    m = module({"name": "simpo", "beta": 2.0, "gamma": 1.0}, strategy="precomputed")
    assert m.reference_strategy == "none" and m.reference is None
    assert {k.replace("__", "/") for k in m.val_metrics} == PAIR_METRICS
    b = batch(m.processor, m.answers)
    loss, metrics = m.forward_batch(b)
    assert set(metrics) == PAIR_METRICS
    rewards = 2.0 * answer_logprobs(m.policy, b, m.pad_token_id) / b["answer_lengths"].T  # beta * token mean
    assert metrics["rewards/chosen"] == pytest.approx(rewards[:, 0].mean().item(), rel=1e-5)
    expected = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1] - 1.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_composite_logs_each_term_and_rewards_of_its_columns():
    terms = {"dpo": 1.0, "anchor": 1.0, "nll": 0.1, "blind": 0.0}
    m = module({"name": "composite", "beta": 0.1, "terms": terms}, strategy="frozen_copy")
    assert m.answers == ("chosen", "rejected") and m.term_names == ("dpo", "anchor", "nll")
    names = PAIR_METRICS | {"terms/dpo", "terms/anchor", "terms/nll"}
    assert {k.replace("__", "/") for k in m.val_metrics} == names
    with torch.no_grad():
        m.policy.lm_head.weight.mul_(1.5)  # policy and reference differ: rewards are not all 0
        loss, metrics = m.forward_batch(batch(m.processor, m.answers))
    assert set(metrics) == names
    assert metrics["rewards/chosen"] != 0
    weighted = metrics["terms/dpo"] + metrics["terms/anchor"] + 0.1 * metrics["terms/nll"]
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ({"name": "robust", "label_smoothing": 0.5}, r"objective robust: robust needs objective.label_smoothing in"),
        ({"name": "dpo", "gamma": 1.0}, r"objective dpo: .*unexpected keyword argument 'gamma'"),
        (
            {"name": "composite", "terms": {"dpo": 1.0}, "answers": ["chosen", "rejected", "blind"]},
            r"objective composite with terms \{'dpo': 1.0\} scores \['chosen', 'rejected'\]",
        ),
        ({"name": "composite", "terms": {"nll": 1.0}}, r"has no reward term"),
    ],
)
def test_a_wrong_objective_setting_is_a_setting_error_before_the_model_loads(objective, message, monkeypatch):
    monkeypatch.setattr("src.models.module.build_model", lambda **_: pytest.fail("the model was built"))
    with pytest.raises(SettingError, match=message):
        module(objective)


@pytest.fixture(scope="module")
def blind_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("blind")  # one generation of blind answers for every objective that needs them


@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_every_objective_config_trains(name, tmp_path, blind_cache):
    """Each configs/objective/*.yaml, three steps in-process; with reference.strategy=precomputed (train.yaml's
    default) an objective that takes no reference log-probs builds no reference and writes no cache."""
    from src.train import train
    from tests.helpers import compose_config

    overrides = [f"objective={name}", "trainer.max_steps=3", "logger=csv", f"blind.cache_dir={blind_cache}"]
    # a few seconds per objective, blind answers included: 16 records, no generated validation samples
    overrides += ["data.max_records=16", "data.batch_size=4", "~callbacks.generation_samples"]
    overrides.append(f"reference.cache_dir={tmp_path}/ref")
    cfg = compose_config("train", overrides, tmp_path / "run")
    metrics = train(cfg)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r.get("train/loss")]
    assert len(steps) == 3
    reference_free = name in ("sft", "simpo")
    assert (tmp_path / "ref").exists() != reference_free
    family = "val/nll/chosen" if name == "sft" else "val/rewards/margins"
    assert family in metrics and all(map(torch.isfinite, map(torch.tensor, metrics.values())))
    if name == "composite":
        assert {"val/terms/dpo", "val/terms/blind", "val/rewards/blind_margins"} <= set(metrics)
        assert steps[-1]["train/terms/dpo"] != "" and steps[-1]["train/terms/blind"] != ""


@pytest.mark.slow
@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_every_objective_config_trains_from_the_command_line(name, tmp_path):
    out = run_entry(
        "train.py",
        f"objective={name}",
        "trainer.max_steps=3",
        "logger=csv",
        f"paths.cache_dir={tmp_path}/cache",
        run_dir=tmp_path / "run",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_composite_config_derives_data_answers_from_its_terms():
    from src.data.encoding import ANSWER_KEYS
    from src.models.objectives import data_needs
    from tests.helpers import compose_config

    cfg = compose_config("train", ["objective=composite"])
    assert data_needs(cfg.objective).answers == ("chosen", "rejected", "blind")
    assert data_needs(cfg.objective).corruption == OmegaConf.to_container(cfg.objective.corruption)
    cfg = compose_config("train", ["objective=composite", "objective.terms={dpo: 0, nll: 0.1, anchor: 1.0}"])
    assert data_needs(cfg.objective).answers == ("chosen", "blind")  # blind: 1.0 from composite.yaml is kept
    every = "objective.terms={dpo: 1, blind: 1, conditional: 1, anchor: 1, nll: 1}"
    assert data_needs(compose_config("train", ["objective=composite", every]).objective).answers == ANSWER_KEYS
    # the data config reads nothing of the objective: what the data needs is derived in code, in one place
    assert "answers" not in cfg.data and "corruption" not in cfg.data
    assert data_needs(compose_config("train", ["objective=dpo"]).objective).corruption is None


def test_composite_terms_without_a_reward_are_a_setting_error_not_a_resolver_trace(tmp_path):
    from src.train import train
    from tests.helpers import compose_config

    overrides = ["objective=composite", "objective.terms={dpo: 0, blind: 0, nll: 1.0}", "logger=csv"]
    with pytest.raises(SettingError, match=r"has no reward term"):
        train(compose_config("train", overrides, tmp_path / "run"))


def test_an_optimized_metric_the_objective_never_logs_fails_before_training(tmp_path):
    """A composite without the dpo term logs no rewards/margins: a sweep on it must not train, then crash."""
    from src.train import train
    from tests.helpers import compose_config

    overrides = ["objective=composite", "objective.terms={dpo: 0, blind: 1.0}", "logger=csv"]
    with pytest.raises(SettingError, match=r"optimized_metric=val/rewards/margins is not logged.*blind_margins"):
        train(compose_config("train", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "data_summary.json").exists()  # stopped before the data was read


# chosen, rejected, chosen_corrupted of 2 records with an image and 1 text-only record, whose corrupted column is
# the chosen answer again (no corrupted image): a tie that is no miss. Image records' margins 0.3 and 0.1.
REWARDS3 = torch.tensor([[0.5, 0.1, 0.2], [0.4, 0.0, 0.3], [0.6, 0.2, 0.6]])
HAS_IMAGE3 = torch.tensor([True, True, False])
CONDITIONAL = ("chosen", "rejected", "chosen_corrupted")


def test_chosen_corrupted_metrics_average_over_records_with_an_image():
    from src.models.module import preference_metrics

    m = preference_metrics(REWARDS3 * 10, REWARDS3, CONDITIONAL, HAS_IMAGE3)
    assert m["rewards/chosen_corrupted_accuracies"].item() == pytest.approx(1.0)  # not 2/3
    assert m["rewards/chosen_corrupted_margins"].item() == pytest.approx(0.2)  # not 0.4 / 3
    assert m["rewards/chosen_corrupted_count"].item() == 2
    assert m["rewards/chosen_corrupted"].item() == pytest.approx(0.25)
    assert m["logps/chosen_corrupted"].item() == pytest.approx(2.5)
    assert m["rewards/accuracies"].item() == pytest.approx(1.0) and m["rewards/margins"].item() == pytest.approx(0.4)
    # a batch with no record with an image: no mean of nothing (neither NaN nor 0), a count of 0
    text_only = preference_metrics(REWARDS3[2:], REWARDS3[2:], CONDITIONAL, HAS_IMAGE3[2:])
    assert text_only["rewards/chosen_corrupted_count"].item() == 0
    assert not {k for k in text_only if k.startswith(("rewards/chosen_corrupted", "logps/chosen_corrupted"))} - {
        "rewards/chosen_corrupted_count"
    }
    assert text_only["rewards/accuracies"].item() == 1.0  # the other metrics as before


def test_validation_weighs_chosen_corrupted_metrics_by_records_with_an_image(monkeypatch):
    """Over an epoch: a batch of 1 image record among 3 counts for 1, not 3 (not a mean of batch means); a batch
    without one adds nothing; the count adds up. An epoch without one logs no accuracy at all."""
    from src.models.module import preference_metrics

    m = module({"name": "composite", "beta": 0.1, "terms": {"dpo": 1.0, "conditional": 1.0}}, strategy="frozen_copy")
    assert m.answers == CONDITIONAL and "rewards/chosen_corrupted_count" in {
        k.replace("__", "/") for k in m.val_metrics
    }
    batches = [  # (rewards, has_image): accuracies 1/1 (one image record of 3), 0/2, and a text-only batch
        (torch.tensor([[0.5, 0.1, 0.2], [0.6, 0.2, 0.6], [0.6, 0.2, 0.6]]), torch.tensor([True, False, False])),
        (torch.tensor([[0.1, 0.0, 0.3], [0.1, 0.0, 0.2]]), torch.tensor([True, True])),
        (torch.tensor([[0.6, 0.2, 0.6]]), torch.tensor([False])),
    ]
    logged = {}
    monkeypatch.setattr(m, "log", lambda name, value, **_: logged.__setitem__(name, value))

    def run_epoch(batches):
        logged.clear()
        for rewards, has_image in batches:
            metrics = preference_metrics(rewards, rewards, CONDITIONAL, has_image)
            monkeypatch.setattr(m, "forward_batch", lambda batch, metrics=metrics: (torch.tensor(0.0), metrics))
            m.validation_step({"ids": ["x"] * len(rewards)}, 0)
        m.on_validation_epoch_end()
        return {k: float(v.compute() if hasattr(v, "compute") else v) for k, v in logged.items()}

    epoch = run_epoch(batches)
    assert epoch["val/rewards/chosen_corrupted_accuracies"] == pytest.approx(1 / 3)  # 1 of 3 records with an image
    assert epoch["val/rewards/chosen_corrupted_margins"] == pytest.approx((0.3 - 0.2 - 0.1) / 3)
    assert epoch["val/rewards/chosen_corrupted_count"] == 3
    for metric in m.val_metrics.values():
        metric.reset()  # as Lightning does at an epoch's end for the metrics it was given
    epoch = run_epoch(batches[2:])
    assert epoch["val/rewards/chosen_corrupted_count"] == 0 and "val/rewards/chosen_corrupted_accuracies" not in epoch
