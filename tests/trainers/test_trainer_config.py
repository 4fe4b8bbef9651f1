"""Bad configuration values fail before any model is loaded, naming the key."""
import pytest

from alignfast.trainers import DPOConfig, KTOConfig, SFTConfig, load_config
from alignfast.trainers import modeling


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(modeling, "load_causal_lm", forbidden)


@pytest.mark.parametrize("cls,overrides,key", [
    (SFTConfig, ["learning_rte=1e-5"], "learning_rte"),
    (DPOConfig, ["loss_type=sigmoidal"], "loss_type"),
    (DPOConfig, ["beta=0"], "beta"),
    (KTOConfig, ["beta=-0.1"], "beta"),
    (SFTConfig, ["per_device_batch_size=0"], "per_device_batch_size"),
    (SFTConfig, ["gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    (SFTConfig, ["model=/does/not/exist"], "model"),
    (SFTConfig, ["model="], "model"),
    (SFTConfig, ["lr_scheduler=exponential"], "lr_scheduler"),
    (SFTConfig, ["on_bad_record=ignore"], "on_bad_record"),
    (SFTConfig, ["per_device_batch_size=two"], "per_device_batch_size"),
    (SFTConfig, ["report_to=[jsonl,carrier_pigeon]"], "report_to"),
    (KTOConfig, ["desirable_weight=0"], "desirable_weight"),
    (KTOConfig, ["per_device_batch_size=1"], "per_device_batch_size"),
    (SFTConfig, ["dataset=/no/such.jsonl"], "dataset"),
    (SFTConfig, ["dataset=no_such.jsonl"], "dataset"),
    (SFTConfig, ["attn_implementation=flash_attention_2"], "attn_implementation"),   # flash_attn absent here
    (SFTConfig, ["eval_dataset=./no/such/dir"], "eval_dataset"),
    (DPOConfig, ["method=rlhf"], "method"),
    (DPOConfig, ["method=cpo", "loss_type=robust"], "loss_type"),
    (DPOConfig, ["f_divergence=tv"], "f_divergence"),
    (DPOConfig, ["method=simpo", "f_divergence=forward_kl"], "f_divergence"),
    (DPOConfig, ["method=orpo", "precompute_ref_logps=true"], "precompute_ref_logps"),
    (DPOConfig, ["cpo_alpha=-1"], "cpo_alpha"),
    (SFTConfig, ["seed=-1"], "seed"),
    (SFTConfig, [f"seed={2**32}"], "seed"),
    (SFTConfig, ["max_grad_norm=.nan"], "max_grad_norm"),   # NaN would silently turn clipping off
    (SFTConfig, ["learning_rate=.inf"], "learning_rate"),
    (SFTConfig, ["weight_decay=.nan"], "weight_decay"),
    (SFTConfig, ["max_steps=3.5"], "max_steps"),
    (SFTConfig, ["report_to=[jsonl"], "report_to"),         # not YAML
])
def test_bad_values_name_the_key(cls, overrides, key, tiny_model_dir):
    with pytest.raises(ValueError, match=key):
        load_config(cls, None, overrides, model=tiny_model_dir)


def test_hub_dataset_ids_pass_validation(tiny_model_dir):
    """A hub id is fetched when the data loads (not at validation, which touches nothing)."""
    cfg = load_config(SFTConfig, None, ["dataset=trl-lib/Capybara", "dataset_split=train[:100]"],
                      model=tiny_model_dir)
    assert (cfg.dataset, cfg.dataset_split, cfg.eval_split) == ("trl-lib/Capybara", "train[:100]", "test")


def test_missing_model_is_required():
    with pytest.raises(ValueError, match="model"):
        load_config(SFTConfig, None, [])


def test_yaml_then_overrides(tmp_path, tiny_model_dir):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {tiny_model_dir}\nbeta: 0.3\nlearning_rate: 1.0e-6\nreport_to: [jsonl]\n")
    cfg = load_config(DPOConfig, str(path), ["beta=0.5", "max_steps=7"])
    assert (cfg.beta, cfg.learning_rate, cfg.max_steps, cfg.report_to) == (0.5, 1e-6, 7, ["jsonl"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model_dir}\nbeta: 0\n")
    with pytest.raises(ValueError, match="beta"):
        load_config(DPOConfig, str(bad))


def test_yaml_is_safe_loaded(tmp_path, tiny_model_dir):
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: {tiny_model_dir}\nseed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError|python/object"):
        load_config(SFTConfig, str(path))


def test_config_hash_ignores_logging_only(tiny_model_dir):
    a = load_config(SFTConfig, None, ["logging_steps=3", "save_steps=2"], model=tiny_model_dir)
    b = load_config(SFTConfig, None, ["logging_steps=5"], model=tiny_model_dir)
    c = load_config(SFTConfig, None, ["learning_rate=1e-3"], model=tiny_model_dir)
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_grpo_options_added_later_keep_earlier_runs_hashes(tiny_model_dir):
    """GSPO's level, two-sided clipping and the ρ-weighted KL came after GRPO runs existed: where they train as
    those runs did (defaults; the weighting without a KL term) they stay out of the hash, so those runs resume;
    where they change the loss, the hash changes."""
    from alignfast.trainers.grpo import GRPOConfig

    def grpo(*overrides):
        return load_config(GRPOConfig, None, list(overrides), model=tiny_model_dir, reward_funcs=["a:b"])

    default = grpo()
    assert not {"importance_sampling_level", "delta", "use_bias_correction_kl"} & default.identity().keys()
    assert grpo("use_bias_correction_kl=false").config_hash() == default.config_hash()
    assert len({default.config_hash(), grpo("delta=1.5").config_hash(),
                grpo("importance_sampling_level=sequence").config_hash()}) == 3
    assert grpo("beta=0.1").config_hash() != grpo("beta=0.1", "use_bias_correction_kl=false").config_hash()


def test_a_config_built_in_python_gets_the_same_checks(tiny_model_dir):
    """Values are brought to their fields' types as from YAML; what cannot be is a ValueError naming the key."""
    cfg = SFTConfig(model=tiny_model_dir, weight_decay="0.1", seed="7", report_to="jsonl").validate()
    assert (cfg.weight_decay, cfg.seed, cfg.report_to) == (0.1, 7, ["jsonl"])
    for key, value in [("weight_decay", "heavy"), ("max_steps", 3.5), ("adam_beta1", None), ("beta", "x")]:
        with pytest.raises(ValueError, match=key):
            DPOConfig(model=tiny_model_dir, **{key: value}).validate()


def test_malformed_yaml_names_the_file(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: [0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml' is not valid YAML"):
        load_config(DPOConfig, str(path), [], model=tiny_model_dir)


def test_reward_weights_are_checked_before_loading(tiny_model_dir):
    from alignfast.trainers import STAGES

    with pytest.raises(ValueError, match="reward_weights must be numbers"):
        load_config(STAGES["grpo"][0], None, ["reward_weights=[a]"], model=tiny_model_dir)


def test_a_missing_model_under_a_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    """`out/sft` reads like org/name; with a local `out/` it is a model not trained yet, reported before any
    load (it went to the hub: retries, then an OSError traceback)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"model: 'out/sft' is not an existing directory"):
        load_config(SFTConfig, None, [], model="out/sft")
    assert load_config(SFTConfig, None, [], model="org/name").model == "org/name"  # still a hub id
