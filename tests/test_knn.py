"""Weighted k-NN (dino_jax.evaluate.knn) against the official eval_knn.py knn_classifier (tests/torch_ref/knn.py),
and the exp(sim / T) weighting on a hand-built case where it overrules the majority."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_jax.evaluate import knn
from tests.torch_ref import knn as ref


def _features(n, classes, dim, signal, seed):
  """Noisy points around class centres shared by every call (the centres come from seed 0)."""
  centres = np.random.default_rng(0).normal(size=(classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  return (signal * centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5)])
def test_matches_official_knn_classifier(k, temperature):
  classes = 10
  train_f, train_y = _features(600, classes, 16, 0.5, seed=1)
  test_f, test_y = _features(300, classes, 16, 0.5, seed=2)
  # The official pipeline L2-normalises the extracted features once, then calls knn_classifier.
  tr, te = F.normalize(torch.from_numpy(train_f), dim=1), F.normalize(torch.from_numpy(test_f), dim=1)
  want = ref.knn_classifier(tr, torch.from_numpy(train_y), te, torch.from_numpy(test_y), k, temperature, classes)
  got = knn.knn_classifier(train_f, train_y, test_f, test_y, k=k, temperature=temperature, num_classes=classes,
                           chunk_size=64)
  assert got[0] == pytest.approx(want[0], abs=1e-9)
  assert got[1] == pytest.approx(want[1], abs=1e-9)
  assert 20.0 < got[0] < 95.0   # neither trivial nor hopeless: the comparison is informative


def test_weights_overrule_the_majority():
  """k = 5: three class-0 neighbours at cosine 0.5, two class-1 neighbours at 0.99. Votes exp(0.5/0.07) x 3 = 3.8e3
  against exp(0.99/0.07) x 2 = 2.8e6: class 1, where a plain majority would say class 0."""
  def unit(cos):   # a 2-d unit vector at the given cosine to (1, 0)
    return [cos, np.sqrt(1 - cos ** 2)]
  train = np.array([unit(0.5)] * 3 + [unit(0.99)] * 2 + [unit(-1.0)] * 4, np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  test = np.array([[1.0, 0.0]], np.float32)
  assert knn.knn_classifier(train, labels, test, np.array([1]), k=5, temperature=0.07, num_classes=3)[0] == 100.0
  assert knn.knn_classifier(train, labels, test, np.array([0]), k=5, temperature=0.07, num_classes=3)[0] == 0.0
  # features are L2-normalised first: scaling one training vector changes nothing
  scaled = train.copy()
  scaled[3] *= 7.0
  assert knn.knn_classifier(scaled, labels, test, np.array([1]), k=5, temperature=0.07, num_classes=3)[0] == 100.0


def test_k_larger_than_the_train_set_is_named():
  with pytest.raises(ValueError, match="k=5"):
    knn.knn_classifier(np.ones((3, 2)), np.zeros(3, int), np.ones((1, 2)), np.zeros(1, int), k=5)


def test_evaluation_features_use_the_running_statistics():
  """The k-NN / probe features of a network with BatchNorm are eval-mode features (eval_knn.py calls model.eval()):
  a ResNet trunk with randomised running statistics against the PyTorch reference in eval mode."""
  from flax import nnx  # noqa: PLC0415
  from dino_jax import models  # noqa: PLC0415
  from dino_jax.evaluate import features  # noqa: PLC0415
  from dino_jax.interop import torch as interop  # noqa: PLC0415
  from tests.test_models_resnet import randomise_batchnorms  # noqa: PLC0415
  from tests.torch_ref.resnet import ResNet50  # noqa: PLC0415

  torch.manual_seed(0)
  net = ResNet50(width=8)
  for i in range(4):
    setattr(net, f"layer{i + 1}", getattr(net, f"layer{i + 1}")[:1])
  randomise_batchnorms(net, 1)
  ours = models.ResNet((1, 1, 1, 1), width=8, rngs=nnx.Rngs(0))
  interop.load_state_dict(ours, {k: v.numpy() for k, v in net.state_dict().items()})
  graphdef, params, stats = nnx.split(ours, nnx.Param, nnx.BatchStat)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
  fn = features.make_feature_fn(graphdef, mean, std)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  got = np.asarray(fn(params.to_pure_dict(), stats.to_pure_dict(), images))
  x = (images / np.float32(255) - np.float32(mean)) / np.float32(std)
  with torch.no_grad():
    want = net.eval().features(torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2))).numpy()
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
