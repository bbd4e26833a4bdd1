"""The weighted k-NN of the official eval_knn.py (knn_classifier), in PyTorch, for parity tests.

Chunks of num_test // 100 test images (so at least 100 test images); each: similarities to all train features, top-k
sorted, one-hot labels of the neighbours weighted by exp(similarity / T) summed per class, classes sorted by their
sum; top-1 and top-min(5, k) hits counted.
"""
import torch


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
  train_t = train_features.t()
  n_test = test_labels.shape[0]
  per_chunk = n_test // 100
  top1 = top5 = total = 0
  for start in range(0, n_test, per_chunk):
    feats = test_features[start:min(start + per_chunk, n_test)]
    targets = test_labels[start:min(start + per_chunk, n_test)]
    b = targets.shape[0]
    sim = feats @ train_t
    dist, idx = sim.topk(k, largest=True, sorted=True)
    neighbours = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
    one_hot = torch.zeros(b * k, num_classes)
    one_hot.scatter_(1, neighbours.view(-1, 1), 1)
    votes = torch.sum(one_hot.view(b, -1, num_classes) * dist.div(T).exp().view(b, -1, 1), 1)
    # Official: votes.sort(1, True), whose order among equal votes (the classes with no neighbour) is unspecified;
    # stable=True picks one of its valid outcomes, lower class first, so top-5 is comparable whatever k.
    _, order = votes.sort(dim=1, descending=True, stable=True)
    correct = order.eq(targets.view(-1, 1))
    top1 += correct.narrow(1, 0, 1).sum().item()
    top5 += correct.narrow(1, 0, min(5, k)).sum().item()
    total += b
  return top1 * 100.0 / total, top5 * 100.0 / total
