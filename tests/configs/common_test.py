"""What the tiny test variants of the digits quickstarts share."""


def tiny(c):
  """Seconds long, for the end-to-end tests: 2 epochs at batch 16, a one-block ViT of width 32, 2 local crops, a log
  line every step and a checkpoint every two, the lr warm-up over the first epoch."""
  c.epochs = 2
  c.optim.warmup_epochs = 1
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.model.overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 16}
  c.crops.local_number = 2
  c.eval.knn_k = (5,)
  c.eval.every_epochs = 1            # online k-NN at each epoch end (the max_steps runs stop before)
  return c
