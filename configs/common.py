"""Defaults shared by the recipes: the official main_dino.py / main_swav.py defaults, one place each."""
import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_defaults():
  """main_dino.py defaults (ViT-S/16, 100 epochs). Recipes override what their command line changes."""
  c = ml_collections.ConfigDict()
  c.method = "dino"
  c.seed = 0
  c.epochs = 100
  c.batch_size = 512            # global; the official default is 64 per GPU, the README runs use 8 GPUs
  c.max_steps = ml_collections.config_dict.placeholder(int)  # stop early (debugging); schedules still span `epochs`
  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.block_each_step = False     # True only for several fake CPU devices (they deadlock on 2 cores otherwise)
  c.profile_steps = ()          # (a, b): a jax.profiler trace of steps a..b into <workdir>/plugins/profile

  c.log = ml_collections.ConfigDict()   # metrics.jsonl always (dino_jax/writers.py)
  c.log.tensorboard = True              # event files in the workdir: tensorboard --logdir <workdir>
  c.log.wandb_project = ml_collections.config_dict.placeholder(str)   # set: also log to W&B (pip install wandb)
  c.log.wandb_entity = ml_collections.config_dict.placeholder(str)

  # Multi-process runs: a dead peer (killed, out of memory, lost node) ends every survivor with a message and exit
  # code 1 within about heartbeat_timeout_s + 10 s, or within step_timeout_s of the last finished step when a
  # collective hangs (NCCL can wait for ever). Rerunning the same command resumes from the last checkpoint.
  c.multihost = ml_collections.ConfigDict()
  c.multihost.heartbeat_timeout_s = 60   # jax.distributed heartbeat: a peer silent this long is declared dead
  c.multihost.init_timeout_s = 300       # every process must join jax.distributed.initialize within this
  c.multihost.step_timeout_s = 600       # watchdog: no step finished for this long (compilation excepted) -> stop

  c.model = ml_collections.ConfigDict()
  c.model.arch = "vit_small"
  c.model.patch_size = 16
  c.model.drop_path_rate = 0.1
  c.model.out_dim = 65536
  c.model.norm_last_layer = True
  c.model.use_bn_in_head = False
  c.model.head_nlayers = 3
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  c.model.dtype = "bfloat16"    # compute dtype; parameters, softmax, loss and centre are float32
  c.model.overrides = ml_collections.ConfigDict()  # e.g. {'depth': 4} to shrink a ViT for CPU runs
  # What the backward keeps of each backbone block: 'none', 'block' (nothing: recompute the block) or 'dots' (the
  # matmul outputs). 'block' keeps ViT-S/16's residuals at 1.4 GiB against 15.8 GiB for 'none' (bf16, batch 64,
  # 2x224 + 8x96) for +27 % step FLOPs (analytic): experiments/results/bench_memory_cpu.md.
  c.model.remat = "block"

  c.teacher_momentum = 0.996    # cosine to 1 per iteration; 0.9995 recommended for batch 256

  c.loss = ml_collections.ConfigDict()
  c.loss.student_temp = 0.1
  c.loss.warmup_teacher_temp = 0.04
  c.loss.teacher_temp = 0.04
  c.loss.warmup_teacher_temp_epochs = 0
  c.loss.center_momentum = 0.9
  c.loss.centering = "center"   # or 'sinkhorn' (DINOv2)
  c.loss.sinkhorn_iters = 3
  nonfinite_policy(c.loss)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"        # 'adamw' (ViT), 'sgd' or 'lars' (ResNet)
  c.optim.lr = 5e-4             # at batch 256; scaled linearly with the global batch
  c.optim.lr_scaling = True
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 10
  c.optim.start_warmup = 0.0
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.clip_grad = 3.0       # per tensor; 0 disables
  c.optim.freeze_last_layer = 1  # epochs
  c.optim.momentum = 0.9        # sgd / lars
  c.optim.decay_all = False     # True: weight decay on every tensor (SwAV); False: not on biases and 1-D tensors

  c.crops = ml_collections.ConfigDict()
  c.crops.global_size = 224
  c.crops.global_number = 2
  c.crops.global_scale = (0.4, 1.0)
  c.crops.local_size = 96
  c.crops.local_number = 8
  c.crops.local_scale = (0.05, 0.4)
  c.crops.interpolation = "bicubic"
  c.crops.flip = True

  c.aug = ml_collections.ConfigDict()
  c.aug.jitter = (0.4, 0.4, 0.2, 0.1)
  c.aug.jitter_p = 0.8
  c.aug.gray_p = 0.2
  c.aug.blur_p_global = (1.0, 0.1)
  c.aug.blur_p_local = 0.5
  c.aug.blur_sigma = (0.1, 2.0)
  c.aug.solarize_p_global = (0.0, 0.2)
  c.aug.solarize_p_local = 0.0
  c.aug.mean = IMAGENET_MEAN
  c.aug.std = IMAGENET_STD
  c.aug.dtype = "float32"       # the augmented crops (the model casts them to its compute dtype)

  c.data = ml_collections.ConfigDict()
  c.data.source = ml_collections.config_dict.placeholder(str)  # e.g. 'imagefolder:/data/imagenet/train'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.num_workers = 10       # grain worker processes (0: in-process)
  c.data.threads_per_worker = 2
  c.data.prefetch_batches = 2   # per worker; elements are whole batches
  c.data.crop_on = "device"     # "device": workers decode, the step cuts + resizes the crops (data/resize.py); "cpu"
  c.data.device_image_size = 512  # crop_on="device": decoded images padded to D x D (larger ones DCT-downscaled)
  c.data.jpeg_draft = True      # decode large JPEGs at 1/2..1/8 scale when every crop allows it (multicrop.py)
  c.data.exif_transpose = False  # torchvision ignores EXIF orientation
  c.data.device_prefetch = 2    # batches put on the device ahead of the step
  c.data.on_bad_image = "skip"  # or "fail"

  c.eval = ml_collections.ConfigDict()
  c.eval.train_source = ml_collections.config_dict.placeholder(str)
  c.eval.test_source = ml_collections.config_dict.placeholder(str)
  c.eval.image_size = 224
  c.eval.resize_size = 256
  c.eval.batch_size = 256
  c.eval.knn_k = (10, 20, 100, 200)
  c.eval.knn_temperature = 0.07
  c.eval.compare_random_init = False
  c.eval.every_epochs = 0           # >0: k-NN during training on subsets (evaluate/online_knn.py); 0: at the end only
  c.eval.online_train_samples = 10000   # at most this many train / test images for it (0: all)
  c.eval.online_test_samples = 2000
  c.eval.linear = linear_defaults()
  return c


SWAV_STD = (0.228, 0.224, 0.225)  # SwAV's src/multicropdataset.py (not ImageNet's 0.229)


def swav_defaults():
  """main_swav.py defaults (ResNet-50, 2x224 + 6x96 as in every released script). Recipes set what their script sets.

  Shared keys mean what they mean for DINO: `batch_size` is global (per crop), `optim.lr` the peak lr, here NOT scaled
  with the batch (`lr_scaling` False: SwAV's scripts give base_lr for their batch), `optim.min_lr` is `final_lr`.
  """
  c = dino_defaults()
  c.method = "swav"
  c.epochs = 100
  c.batch_size = 256            # global; the official default is 64 per GPU
  del c.teacher_momentum        # no teacher: state.teacher is kept equal to the trained network

  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet50"
  c.model.patch_size = 16       # for a ViT backbone
  c.model.drop_path_rate = 0.0  # for a ViT backbone (ResNet-50 has no stochastic depth)
  c.model.hidden_mlp = 2048     # projection 2048 -> hidden_mlp (BN, ReLU) -> feat_dim
  c.model.feat_dim = 128
  c.model.nmb_prototypes = 3000
  c.model.dtype = "bfloat16"    # compute dtype; parameters, BatchNorm statistics, scores and Sinkhorn are float32
  c.model.overrides = ml_collections.ConfigDict()  # backbone constructor overrides, e.g. {'width': 16}
  c.model.remat = "none"        # 'none' | 'block' | 'dots' as for DINO; ResNet-50 at batch 256 fits without (not measured yet)

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.1
  c.loss.epsilon = 0.05
  c.loss.sinkhorn_iters = 3
  c.loss.crops_for_assign = (0, 1)
  c.loss.queue_length = 0       # 0: no queue; trimmed to a multiple of the global batch, split over the devices
  c.loss.epoch_queue_starts = 15
  nonfinite_policy(c.loss)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "larc"         # apex LARC (trust 0.001, clip False) around SGD
  c.optim.momentum = 0.9
  c.optim.lr = 4.8              # base_lr
  c.optim.lr_scaling = False
  c.optim.min_lr = 0.0          # final_lr
  c.optim.warmup_epochs = 10
  c.optim.start_warmup = 0.0
  c.optim.weight_decay = 1e-6   # wd, constant, on every parameter (biases and BatchNorm included)
  c.optim.weight_decay_end = 1e-6
  c.optim.decay_all = True
  c.optim.clip_grad = 0.0
  c.optim.freeze_prototypes_niters = 313

  c.crops.global_size = 224
  c.crops.global_number = 2
  c.crops.global_scale = (0.14, 1.0)
  c.crops.local_size = 96
  c.crops.local_number = 6
  c.crops.local_scale = (0.05, 0.14)
  c.crops.interpolation = "bilinear"  # torchvision's RandomResizedCrop default (DINO passes bicubic)

  c.aug = ml_collections.ConfigDict()  # get_color_distortion(s=1.0) + PILRandomGaussianBlur on every crop
  c.aug.jitter = (0.8, 0.8, 0.8, 0.2)
  c.aug.jitter_p = 0.8
  c.aug.gray_p = 0.2
  c.aug.blur_p_global = 0.5
  c.aug.blur_p_local = 0.5
  c.aug.blur_sigma = (0.1, 2.0)
  c.aug.solarize_p_global = 0.0
  c.aug.solarize_p_local = 0.0
  c.aug.mean = IMAGENET_MEAN
  c.aug.std = SWAV_STD
  c.aug.dtype = "float32"
  return c


def nonfinite_policy(loss):
  """What a non-finite loss does: 'stop' freezes the state at its last finite value and ends the run (with the step
  named); 'skip' drops that step's update (parameters, optimiser and method state unchanged), counts it in the
  metrics ('skipped_steps') and stops only at `max_consecutive_nonfinite` skipped steps in a row."""
  loss.on_nonfinite = "stop"
  loss.max_consecutive_nonfinite = 10
  return loss


def linear_defaults():
  """eval_linear.py's defaults (python -m dino_jax.evaluate --linear): the [CLS] tokens of the last 4 blocks (ViT-S;
  ViT-B recipes use 1 block + pooled patch tokens), 100 epochs, lr 0.001 x batch / 256, batch 1024 (128 x 8 GPUs),
  RandomResizedCrop scale 0.08-1 + flip, validation every epoch."""
  c = ml_collections.ConfigDict()
  c.epochs = 100
  c.lr = 0.001
  c.batch_size = 1024
  c.n_last_blocks = 4
  c.avgpool = False
  c.val_freq = 1
  c.seed = 0
  c.crop_scale = (0.08, 1.0)
  c.flip = True
  return c


def imagenet_paths(c, arg):
  """`--config=configs/x.py:/data/imagenet` points training at <dir>/train and the k-NN at <dir>/{train,val}."""
  if arg:
    root = arg.rstrip("/")
    c.data.source = f"imagefolder:{root}/train"
    c.eval.train_source = f"imagefolder:{root}/train"
    c.eval.test_source = f"imagefolder:{root}/val"
  return c


def digits_quickstart(c, *, photometry: bool):
  """The embedded digits dataset on a 2-core CPU: a small ViT (patch 4, 2 blocks, width 64) at batch 64, 2 global
  16-px crops (scale 0.5-1) and 4 local 8-px crops (scale 0.2-0.5) of the 32-px digits, no flip (digits are not
  mirror-symmetric), in-process data loading, float32 compute (bf16 matmuls are emulated on CPUs), k-NN on the 360
  test digits against random initialisation.

  photometry=False switches the recipe's colour jitter, grayscale, blur and solarisation off (the quickstart configs'
  docstrings say what each choice measured).
  """
  c.batch_size = 64
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500
  c.model.arch = "vit_tiny"
  c.model.patch_size = 4
  c.model.overrides = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 16}
  c.model.dtype = "float32"
  c.model.remat = "none"       # a 2-block ViT needs no memory saving; recomputing would only cost CPU time
  c.crops.global_size = 16
  c.crops.local_size = 8
  c.crops.global_scale = (0.5, 1.0)  # at least half the digit; the ImageNet scales leave little of an 8x8 scan
  c.crops.local_number = 4
  c.crops.local_scale = (0.2, 0.5)
  c.crops.flip = False
  if not photometry:
    off = lambda p: tuple(0.0 for _ in p) if isinstance(p, tuple) else 0.0   # per-crop tuples or one probability
    c.aug.jitter_p = 0.0
    c.aug.gray_p = 0.0
    c.aug.blur_p_global = off(c.aug.blur_p_global)
    c.aug.blur_p_local = 0.0
    c.aug.solarize_p_global = off(c.aug.solarize_p_global)
  c.data.source = "digits:train"
  c.data.num_workers = 0             # in-process: the 2 cores are busy with the model
  c.data.crop_on = "cpu"             # the "device" is these same 2 cores; keeps the measured quickstart figures
  c.eval.train_source = "digits:train"
  c.eval.test_source = "digits:test"
  c.eval.image_size = 16
  c.eval.resize_size = 16
  c.eval.batch_size = 256
  c.eval.knn_k = (10, 20)
  c.eval.compare_random_init = True
  c.eval.every_epochs = 5            # online k-NN (seconds here): 'k-NN over training' in the plots
  c.eval.online_train_samples = 1000
  c.eval.linear.batch_size = 128     # python -m dino_jax.evaluate --linear: 11 steps per epoch, 100 epochs
  c.eval.linear.lr = 0.3             # the official 0.001 barely moves the classifier in 1,100 steps (measured: 19%)
  c.eval.linear.crop_scale = (0.5, 1.0)   # the training crops' scale; 0.08 leaves little of a digit
  c.eval.linear.flip = False
  return c
