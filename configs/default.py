"""Every configuration field, with its meaning and the paper's value.

Other configs import this one and override a few fields. The config is locked by
`main.py`, so a mistyped `--config.x=...` is an error rather than a silent default.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the paper's GTA5 -> Cityscapes MetaPix-W1 setting (Table 1)."""
    config = ml_collections.ConfigDict()

    # What main.py does: 'train' (run the schedule), 'eval' (mIoU of a checkpoint),
    # 'compare' (train and evaluate several methods side by side; the demo uses it),
    # 'results' (a markdown table of every finished run under --workdir, over seeds).
    # 'predict' (segment image files; export weight maps: see config.predict).
    config.mode = "train"
    # 'metapix' (Algorithm 1), 'direct_joint' (joint training for as many segmenter steps
    # as MetaPix takes), 'target_only' (target images alone, same number of steps), or a
    # baseline/variant: 'finetune', 'metapix_online', 'hrselect', 'fda', 'minent'
    # (metapix_jax/methods.py says what each one trains).
    config.method = "metapix"
    # The methods that 'compare' mode runs, each in WORKDIR/<method>; besides the methods
    # above, methods.VARIANTS names such as 'focal' or 'metapix_w19' (a method + fields).
    config.compare_methods = ("target_only", "direct_joint", "metapix")
    config.seed = 1234
    # Multi-process runs (several hosts): 'auto' calls jax.distributed.initialize when
    # the environment or the fields below name several processes, 'on' always, 'off' never.
    config.distributed = "auto"
    config.coordinator_address = ""  # host:port of process 0 ('' = JAX_COORDINATOR_ADDRESS).
    config.num_processes = -1  # Processes in the run (-1 = JAX_NUM_PROCESSES or detected).
    config.process_id = -1  # This process's index (-1 = JAX_PROCESS_ID or detected).
    # Seconds after which the processes of a multi-process run give up on one that stopped
    # answering (killed, host lost) and end with an error (jax's default is 100).
    config.heartbeat_timeout = 60

    # ---- data -------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.source_root = ""  # GTA5 layout: images/*.png and labels/*.png.
    data.target_root = ""  # Cityscapes layout: leftImg8bit/ and gtFine/.
    data.target_train_split = "train"
    data.target_eval_split = "val"
    data.height = 512  # Every image is resized to height x width (paper: 1024x512).
    data.width = 1024
    data.num_classes = 19  # The Cityscapes train classes (the label maps fix it at 19).
    data.ignore_label = 255  # Unlabeled pixels' train id (fixed by the label maps).
    data.source_batch = 1  # Global batch of source images per step (paper: 1).
    data.target_batch = 1  # Global batch of target images per step (paper: 1).
    data.eval_batch = 1
    data.target_flip = True  # Random horizontal flip of target training images.
    data.normalization = "imagenet"  # 'imagenet' (RGB, mean/std) or 'caffe' (BGR - mean).
    data.num_threads = 4  # Decoding threads per input stream.
    data.num_workers = 0  # Decoding processes per training stream (grain mp_prefetch; 0 = none).
    data.source_kind = (
        "gta5"  # Source layout: 'gta5' (images/, labels/) or 'synthia' (RGB/, GT/LABELS/).
    )
    data.source_list = ""  # File naming the source images to use, one per line ('' = all).
    data.target_train_list = ""  # Same for the target train split ('' = all).
    data.target_eval_list = ""  # Same for the target eval split ('' = all).
    # 'full': official Cityscapes (logits upsampled to the native label size, labels never
    # resized); 'resized': the authors' (labels nearest-resized to height x width).
    data.eval_protocol = "full"
    data.target_format = "folder"  # Target read from 'folder' (target_root) or 'tfds' (cityscapes).
    data.tfds_data_dir = ""  # tensorflow-datasets data_dir for target_format='tfds' ('' = default).
    data.source_prepared = ""  # Prepared array_record dir (metapix_jax.data.prepare); '' = PNGs.
    data.skip_bad_files = False  # Replace an unreadable example by the next readable one (logged).
    # The embedded synthetic benchmark: when true, it is generated (once, by seed) under
    # synthetic_root and source_root/target_root point into it (see configs/demo.py).
    data.synthetic = False
    data.synthetic_root = ""  # Where the benchmark is written ('' = WORKDIR/benchmark).
    data.synthetic_seed = 0  # Seed of the generated dataset (not of training).
    data.synthetic_num_source = 2000
    data.synthetic_num_target_train = 20
    data.synthetic_num_target_val = 200
    data.synthetic_gap = 1.0  # Strength of the visual domain gap (0 = same rendering).
    # Kind of harmful source pixels: confusion, spatial, noise, appearance or none (README).
    data.synthetic_harm = "confusion"
    data.synthetic_harm_rate = 0.7  # 'confusion': chance that a confusable region is mislabeled.
    # 'confusion': the source label convention, true class > class written, comma-separated.
    data.synthetic_confusions = "sidewalk>road,terrain>vegetation,car>truck,bus>train"
    data.synthetic_spatial_rate = 0.7  # 'spatial': chance that a region is annotated coarsely.
    data.synthetic_spatial_px = 2  # 'spatial': how far a coarse annotation spills (pixels).
    data.synthetic_noise_rate = 0.12  # 'noise': chance that a region gets a random other class.
    # 'appearance': true class > class whose look it takes in the source (labels stay right).
    data.synthetic_appearance = "sidewalk>road,terrain>vegetation,car>truck,bus>train"
    data.synthetic_appearance_rate = 0.7  # 'appearance': chance that a region takes that look.

    # ---- segmenter f_theta: FCN-8s on VGG-16 -----------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.width = 1.0  # Channel multiplier of every VGG/fc layer (1.0 = the real VGG-16).
    model.fc_dim = 4096  # Channels of fc6 and fc7 (scaled by width).
    model.fc6_kernel = 7  # fc6 kernel size (7 as in VGG-16).
    model.fc6_padding = "VALID"  # 'VALID' as the authors; 'SAME' for tiny images.
    model.split_block = 1  # The first k VGG blocks have a source and a target copy (0..5).
    model.dropout = 0.5  # Channel dropout after fc6 and fc7.
    model.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); params stay float32.
    model.remat = False  # Recompute each VGG block in the backward pass (less memory).

    # ---- initialisation -----------------------------------------------------------------
    config.init = init = ml_collections.ConfigDict()
    # ImageNet VGG-16 weights for the segmenter: torchvision's vgg16-*.pth or timm's
    # vgg16.tv_in1k model.safetensors (needs model.width=1.0); '' = random init.
    init.vgg16 = ""

    # ---- weighting network f_phi: U-Net ----------------------------------------------
    config.weighting = weighting = ml_collections.ConfigDict()
    weighting.kind = "w1"  # 'w1': one weight per pixel; 'w19': one per pixel and class.
    weighting.base_channels = 64  # 64-128-256-256 as the authors' U-Net.
    weighting.depth = 3  # Number of down-sampling steps.
    weighting.init_bias = 1.0  # Output bias: initial weight sigmoid(1) = 0.73.
    weighting.init_std = 0.01  # Conv kernels start at N(0, init_std^2).
    weighting.remat = False  # Recompute each U-Net double conv in the backward pass.
    # How the weights enter the source loss: 'none' (paper) as given, 'batch' divided by their
    # mean over the batch's labeled pixels, 'class' by their mean per labeled class (losses.py).
    weighting.normalization = "none"

    # ---- schedule (Algorithm 1) --------------------------------------------------------
    config.schedule = schedule = ml_collections.ConfigDict()
    schedule.joint_steps = 150_000  # N1: joint pre-training steps.
    schedule.meta_steps = 10_000  # N2: meta steps per generation.
    schedule.weighted_steps = 15_000  # N3: weighted steps per generation.
    schedule.generations = 3  # G.

    # ---- segmenter optimiser ------------------------------------------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 1e-4
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.poly_power = 0.9  # lr * (1 - t/T)^power over all segmenter steps T.
    optim.bias_lr_mult = 2.0  # Biases learn at twice the rate (authors' code).
    optim.weight_decay = 1e-4  # Coupled L2 added to the gradient before Adam.
    # A fresh Adam for every weighted phase, with its own lr decaying over that phase
    # (authors' code); the paper continues one optimiser (default).
    optim.fresh_weighted_optimizer = False
    optim.weighted_learning_rate = 5e-5

    # ---- meta-learning of the weighting network (Algorithm 2) ------------------------------
    config.meta = meta = ml_collections.ConfigDict()
    meta.inner_optimizer = "sgd"  # The differentiable inner step: 'sgd' (paper) or 'adam'.
    meta.inner_learning_rate = 1e-4  # alpha of Algorithm 2.
    meta.learning_rate = 1e-4  # beta: Adam on phi, no decay.
    meta.b1 = 0.9
    meta.b2 = 0.999
    meta.eps = 1e-8
    meta.weight_decay = 0.0  # Coupled L2 on phi (authors' code: 1e-4).
    meta.reinit_per_generation = False  # Re-initialise phi each generation (authors' code).

    # ---- losses -----------------------------------------------------------------------------
    config.loss = loss = ml_collections.ConfigDict()
    loss.source_normalization = "all"  # Weighted source loss / 'all' pixels or 'valid' ones.
    loss.target_normalization = "valid"
    loss.kind = "ce"  # Per-pixel loss of the segmenter steps: 'ce' or 'focal' (Table 1).
    loss.focal_gamma = 2.0  # gamma of the focal loss (Lin et al.'s value).

    # ---- baselines ----------------------------------------------------------------------------
    config.fda = fda = ml_collections.ConfigDict()
    fda.beta = 0.01  # Low band half-width / min(H, W) swapped by method 'fda' (FDA's 0.01).
    config.minent = minent = ml_collections.ConfigDict()
    minent.weight = 0.001  # lambda of the target-entropy term of method 'minent' (AdvEnt's).

    # ---- logging, checkpoints, evaluation ------------------------------------------------
    config.log_every = 100  # Steps between scalar summaries and progress lines.
    config.image_every = 2000  # Steps between TensorBoard images (0 = never).
    config.checkpoint_every = 2000  # Periodic checkpoints (phase ends are always kept).
    config.keep_periodic = 2  # Periodic checkpoints kept besides the phase-end ones.
    config.eval_at_phase_end = True  # mIoU on the target eval split after every phase.
    config.eval_checkpoint = -1  # Eval/predict: the checkpoint's position (-1 = latest).

    # ---- faults ------------------------------------------------------------------------------
    # A step whose loss or gradient is not finite: 'stop' (error; the last checkpoint is kept)
    # or 'skip' (the state stays as it was, the step is counted in the `nonfinite` metric).
    config.nonfinite = "stop"
    # Continue a workdir whose config.json differs in a field that changes training.
    config.allow_config_change = False

    # ---- predict mode ---------------------------------------------------------------------
    config.predict = predict = ml_collections.ConfigDict()
    predict.input = ""  # Images to segment: a folder (searched recursively) or a glob.
    predict.output = ""  # Where the PNGs go ('' = WORKDIR/predict).
    predict.overlay = 0.0  # > 0: also <name>_overlay.png, the colours at this opacity (<= 1).
    predict.color = True  # Write <name>_color.png (the Cityscapes palette).
    predict.train_ids = False  # Also write <name>_trainIds.png (raw train ids, 255 = none).
    # Also write <name>_labelIds.png (Cityscapes label ids, what the official evaluator and
    # the benchmark server read; with predict.color=False a folder holds nothing else).
    predict.label_ids = False
    predict.weights_for = ""  # 'source': also write U-Net weight maps (paper Fig. 3).
    predict.num_weight_images = 10  # How many source images (the first) get weight maps.
    return config
