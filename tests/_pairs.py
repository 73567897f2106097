"""A tiny seeded data set of paired "image"/"text" vectors with sample ids, shared by engine tests."""

import torch
from torch.utils.data import Dataset


class PairData(Dataset):
    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.image, self.text = torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)

    def __len__(self):
        return len(self.image)

    def __getitem__(self, i):
        return {"id": f"p{i}", "image": self.image[i], "text": self.text[i]}
