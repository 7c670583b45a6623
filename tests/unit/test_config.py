"""Config loading (precedence, types, unknown keys), the sections' field checks, and preflight's
machine checks: errors that name the field, a resolved config that leaves its input alone, no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from sd_train.config import (
    MODEL_SUBFOLDERS,
    ConfigError,
    TrainConfig,
    load_config,
    parse_overrides,
)
from sd_train.paths import step_dir
from sd_train.preflight import check_shard_group, preflight, vae_downsampling_factor

REPO = Path(__file__).resolve().parents[2]
# A diffusers VAE config as SD's: four blocks, so a downsampling factor of 8.
SD_VAE_CONFIG = '{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}'


def test_precedence_defaults_yaml_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 50\noptim:\n  lr: 0.5\n")
    cfg = load_config(str(y), ["optim.lr=2e-4", "ema.step_start_ema=null", "eval.prompts=[a, b]"])
    assert cfg.max_steps == 50 and cfg.optim.lr == 2e-4 and cfg.ema.step_start_ema is None
    assert cfg.eval.prompts == ["a", "b"]
    assert cfg.micro_batch_size == TrainConfig().micro_batch_size


@pytest.mark.parametrize(
    "text,match",
    [
        ("max_steps: 5\n1: 2\n", r"config key 1 is a int, not a name"),
        ("optim:\n  yes: 0.1\n", r"config key optim.True is a bool, not a name"),
        ("data:\n  null: x\n", r"config key data.None is a NoneType, not a name"),
    ],
)
def test_non_string_yaml_key_is_a_config_error(tmp_path, text, match):
    """YAML reads `1:`, `yes:` or `null:` as values: the key is named in a ConfigError, not a TypeError."""
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(y))


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr. Did you mean optim.lr\?"):
        load_config(None, ["optim.lrr=1"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("max_steps=abc", "max_steps must be an integer"),
        ("ema.decay=[1]", "ema.decay must be a number"),
        ("dist.strategy=zero", r"dist.strategy='zero' is not one of"),
        ("data=3", "data is a section"),
        ("noequals", "not of the form"),
    ],
)
def test_type_errors_name_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=0.5", "c=true", "d="]) == {"a": {"b": 0.5}, "c": True, "d": ""}
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it.
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_yaml_booleans_spell_the_choices_they_name(tmp_path):
    """YAML 1.1 reads `off` and `no` as false: `dist.memory_check=off` (as the docs write it) and a
    config file's `mixed_precision: no` mean those choices, not a type error; a boolean that spells
    no choice is still refused."""
    cfg = load_config(None, ["dist.memory_check=off", "mixed_precision=no"])
    assert (cfg.dist.memory_check, cfg.mixed_precision) == ("off", "no")
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\ndist:\n  memory_check: off\n")
    cfg = load_config(str(path), [])
    assert (cfg.dist.memory_check, cfg.mixed_precision) == ("off", "no")
    with pytest.raises(ConfigError, match=r"dist.memory_check=True is not one of"):
        load_config(None, ["dist.memory_check=on"])
    with pytest.raises(ConfigError, match=r"dist.strategy=False is not one of"):
        load_config(None, ["dist.strategy=off"])


@pytest.mark.parametrize(
    "section,override,match",
    [
        ("data", "data.shuffle_buffer=-1", "data.shuffle_buffer=-1 must be >= 0"),
        ("objective", "objective.noise_offset=-0.1", "objective.noise_offset=-0.1 must be >= 0"),
        ("optim", "optim.betas=[0.9]", r"optim.betas=\[0.9\] must be two numbers"),
        ("checkpoint", "checkpoint.keep_last_k=-1", "checkpoint.keep_last_k=-1: must be 0"),
        ("dist", "dist.timeout_s=0", "dist.timeout_s=0 must be positive"),
        ("eval", "eval.num_inference_steps=0", "eval.num_inference_steps=0 must be positive"),
        ("metrics", "metrics.log_every=0", "metrics.log_every=0 must be positive"),
    ],
)
def test_section_validate_names_the_field(section, override, match):
    """Each section checks its own fields, alone and through TrainConfig.validate."""
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=match):
        getattr(cfg, section).validate()
    with pytest.raises(ConfigError, match=match):
        cfg.validate(1)


def test_validate_needs_no_file_system():
    """Field checks only: missing shards and model folders are preflight's to report."""
    load_config(None, ["model.pretrained_path=/no/model", "data.train_shards=/no/x.tar"]).validate(1)
    with pytest.raises(ConfigError, match="global_batch_size=32 is not divisible"):
        TrainConfig().validate(3)


@pytest.fixture
def machine(tmp_path):
    """Overrides that make the default config pass preflight: a model folder, 8 shards, an EMA
    window that fits the run, and a complete (fake) checkpoint at step 4."""
    model = tmp_path / "model"
    for sub in MODEL_SUBFOLDERS:
        (model / sub).mkdir(parents=True)
    (model / "vae" / "config.json").write_text(SD_VAE_CONFIG)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(8):
        (shards / f"s-{i:06d}.tar").write_bytes(b"")
    ckpt = step_dir(tmp_path / "run" / "checkpoints", 4)
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / ".metadata").write_bytes(b"")
    return [
        f"model.pretrained_path={model}",
        f"data.train_shards={shards}",
        "data.val_shards=",
        f"output_dir={tmp_path / 'run'}",
        "max_steps=100",
        "ema.decay=0.5",
        "ema.step_start_ema=50",
    ]


def test_preflight_resolves_without_mutating(machine):
    cfg = load_config(None, machine)
    fsdp = preflight(cfg, 1, environ={})
    assert (fsdp.dist.strategy, fsdp.dist.zero_stage) == ("fsdp2", None)
    zero2 = preflight(cfg, 1, environ={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert (zero2.dist.strategy, zero2.dist.zero_stage) == ("deepspeed", 2)
    assert (cfg.dist.strategy, cfg.dist.zero_stage) == ("auto", None), "preflight changed its input"
    assert zero2.optim == cfg.optim and zero2.data == cfg.data
    assert preflight(fsdp, 1, environ={}) == fsdp, "a resolved config resolves to itself"


def test_preflight_checks_the_machine(machine):
    with pytest.raises(ConfigError, match="checkpoint.load_step=8: no complete checkpoint"):
        preflight(load_config(None, [*machine, "checkpoint.load_step=8"]), 1, environ={})
    with pytest.raises(ConfigError, match=r"fewer than world_size x data.num_workers = 4 x 3"):
        preflight(load_config(None, [*machine, "data.num_workers=3"]), 4, environ={})
    with pytest.raises(ConfigError, match="lacks"):
        preflight(load_config(None, [*machine, f"model.pretrained_path={REPO / 'tests'}"]), 1, environ={})


def test_reshard_after_forward_takes_a_group_size_that_divides_the_shard_group(machine):
    """true, false, or a group size strictly between 1 and the shard group size that divides it:
    checked against the launcher's ranks per node (the default shard group) before any process group."""
    node8 = {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}

    def check(*overrides: str):
        cfg = load_config(None, [*machine, "dist.strategy=fsdp2", *overrides])
        check_shard_group(cfg, 16, node8)
        return cfg.dist.reshard_after_forward

    assert [check(f"dist.reshard_after_forward={v}") for v in ("true", "false", "4", "2")] == [True, False, 4, 2]
    assert type(check("dist.reshard_after_forward=true")) is bool and type(check("dist.reshard_after_forward=2")) is int
    for value in ("3", "8", "16"):
        match = rf"dist.reshard_after_forward={value} must divide the shard group size 8.*use one of \[2, 4\]"
        with pytest.raises(ConfigError, match=match):
            check(f"dist.reshard_after_forward={value}")
    assert check("dist.shard_group_size=16", "dist.reshard_after_forward=8") == 8


@pytest.mark.parametrize(
    "channels, good, bad, fix",
    [
        ([128, 256, 512, 512], 40, 36, "use data.resolution=32 or 40"),  # SD's VAE
        ([32, 64, 64], 36, 34, "use data.resolution=32 or 36"),
        ([32, 64], 34, 33, "use data.resolution=32 or 34"),  # the tiny demo VAE
    ],
)
def test_resolution_must_fit_the_models_vae(machine, tmp_path, channels, good, bad, fix):
    """The multiple data.resolution needs follows the model's VAE config, not a fixed 8."""
    model = tmp_path / "model"
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": channels}))
    preflight(load_config(None, [*machine, f"data.resolution={good}"]), 1, environ={})
    factor = 2 ** (len(channels) - 1)
    with pytest.raises(ConfigError, match=rf"data.resolution={bad} must be a multiple of {factor}, .*{fix}"):
        preflight(load_config(None, [*machine, f"data.resolution={bad}"]), 1, environ={})
    (model / "vae" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"model.pretrained_path=.*cannot read block_out_channels"):
        preflight(load_config(None, machine), 1, environ={})


def test_vae_factor_matches_what_diffusers_builds(tmp_path):
    """The factor read from a saved VAE config equals image size / latent size of that VAE's encode."""
    for channels in ((8,), (8, 8), (8, 8, 8)):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            norm_num_groups=8,
        )
        folder = tmp_path / str(len(channels))
        vae.save_pretrained(folder / "vae")
        with torch.no_grad():
            latent = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
        assert vae_downsampling_factor(str(folder)) == 32 // latent.shape[-1] == 2 ** (len(channels) - 1)


def test_preflight_does_not_import_torch(machine):
    """Startup checks stay torch-free, even when checkpoint.load_step makes them look at a step folder."""
    code = (
        "import sys; from sd_train.config import load_config; from sd_train.preflight import preflight; "
        "cfg = preflight(load_config(None, sys.argv[1:]), 1, environ={}); "
        "assert cfg.checkpoint.load_step == 4; "
        "assert 'torch' not in sys.modules, 'preflight imported torch'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *machine, "checkpoint.load_step=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_launch_env_from_torchrun_srun_or_nothing():
    """torchrun's variables win; srun's SLURM variables give the ranks when they are absent; a SLURM
    job of several tasks with no rendezvous is refused naming the fix; nothing means one process."""
    from sd_train.config.launcher import read_launch_env

    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 3, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "gpu-01"}
    env = read_launch_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.source, env.master_port) == (5, 16, 1, "slurm", "29500")
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS=16.*export MASTER_ADDR=\$\(scontrol show hostnames"):
        read_launch_env({k: v for k, v in slurm.items() if k != "MASTER_ADDR"})
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"
    assert read_launch_env({}).world_size == 1


def test_srun_without_rendezvous_exits_2_before_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0")
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/test.yaml", "--plan"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no rendezvous is set" in proc.stderr and "Traceback" not in proc.stderr


def test_deepspeed_knobs_reach_the_engine_config_and_only_where_they_apply():
    from sd_train.parallel.deepspeed import deepspeed_config
    from sd_train.preflight import check_deepspeed_knobs

    base = load_config(
        None, ["dist.strategy=deepspeed", "dist.zero_stage=3", "global_batch_size=8", "micro_batch_size=4"]
    )
    # Unset knobs are DeepSpeed's defaults (a persistence threshold of 1e5 elements included).
    assert set(deepspeed_config(base, 2, 1)["zero_optimization"]) == {"stage"}
    knobs = [
        "dist.zero_overlap_comm=true",
        "dist.zero_reduce_bucket_size=200000000",
        "dist.zero_prefetch_bucket_size=50000000",
        "dist.zero_param_persistence_threshold=0",
    ]
    tuned = load_config(None, ["dist.strategy=deepspeed", "dist.zero_stage=3", *knobs])
    check_deepspeed_knobs(tuned)
    zero = deepspeed_config(tuned, 2, 1)["zero_optimization"]
    assert (zero["overlap_comm"], zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (True, 2e8, 5e7)
    assert zero["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match=r"dist.zero_prefetch_bucket_size applies only to .*zero_stage in \[3\]"):
        check_deepspeed_knobs(
            load_config(None, ["dist.strategy=deepspeed", "dist.zero_stage=2", "dist.zero_prefetch_bucket_size=5"])
        )
    with pytest.raises(ConfigError, match=r"dist.zero_overlap_comm applies only to .*now dist.strategy=fsdp2"):
        check_deepspeed_knobs(load_config(None, ["dist.strategy=fsdp2", "dist.zero_overlap_comm=true"]))


@pytest.mark.parametrize("resolution", [256, 512])
def test_sd2_templates_train_from_fp16_precomputed_latents(resolution: int) -> None:
    """The templates point at `sd-train precompute --dtype float16` output; parsing them reads no
    file (the shards are checked when the run starts), and the comment says how to make them."""
    path = Path(__file__).resolve().parents[2] / "configs" / f"sd2_base_{resolution}.yaml"
    cfg = load_config(str(path))
    assert cfg.data.precomputed and not cfg.data.random_flip and cfg.data.center_crop
    assert cfg.data.resolution == resolution and f"latents-{resolution}" in cfg.data.train_shards
    assert f"--resolution {resolution} --dtype float16" in path.read_text()


def test_sdxl_template_is_mosaics_schedule_with_a_checked_ema_window() -> None:
    """configs/sdxl_base_1024.yaml: lr 1e-4, weight decay 0.01, 10k warmup, constant, 10% caption
    dropout; its EMA window passes the same startup check as any run (and would be refused at the
    default window fraction); its batch divides at 8 and 64 GPUs; its VAE never runs in fp16; it
    trains in SDXL's aspect-ratio buckets."""
    from sd_train.ema.plan import plan_from_config

    path = Path(__file__).resolve().parents[2] / "configs" / "sdxl_base_1024.yaml"
    cfg = load_config(str(path))
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.warmup_steps, o.schedule) == (1e-4, 0.01, 10000, "constant")
    assert cfg.objective.caption_dropout == 0.1 and cfg.model.vae_dtype != "fp16"
    for world in (8, 64):
        cfg.validate(world)
    plan = plan_from_config(cfg.ema, cfg.max_steps)
    plan.check()
    assert plan.figures()["ema/pre_window_share"] <= 0.01
    with pytest.raises(ConfigError, match="pre-window"):
        plan_from_config(load_config(str(path), ["ema.step_start_ema=null"]).ema, cfg.max_steps).check()
    assert "(height, width)" in path.read_text()
    assert cfg.data.buckets == "sdxl" and cfg.data.resolution == 1024  # SDXL's nine standard buckets
