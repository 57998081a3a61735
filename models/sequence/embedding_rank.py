"""The ranking signal of sequence-level CPO ("Sequence-level Large Language Model Training with Contrastive Preference Optimization",
anonymous ACL submission, section 4.3): negatives ranked by the cosine similarity of their sentence embedding to
the ground truth's, for the Plackett-Luce loss (eq. 8).

The embedding model is any local transformers encoder or decoder folder (AutoModel; mean of the last hidden
states over the attention mask), e.g. a sentence-transformers checkpoint's transformer folder, or the policy's
own starting model. No remote code unless configured.
"""

from __future__ import annotations

import torch


class EmbeddingRanker:
    """Loads the embedding model once; `rank` gives the Plackett-Luce order of each example's K texts."""

    def __init__(
        self,
        model_path: str,
        trust_remote_code: bool = False,
        max_length: int = 256,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked out of the mean
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(
            model_path, use_safetensors=True, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, H) float32 mean-pooled last hidden states; an empty text is embedded as its special tokens, or
        as zeros when the tokenizer adds none (its cosine similarity to anything is then 0)."""
        pieces = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            if enc["input_ids"].shape[1] == 0:  # every text empty and no special tokens
                pieces.append(torch.zeros(enc["input_ids"].shape[0], self.model.config.hidden_size))
                continue
            hidden = self.model(**enc).last_hidden_state.float()  # (b, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            pieces.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
        return torch.cat(pieces) if pieces else torch.zeros(0, self.model.config.hidden_size)

    def similarities(self, ground_truths: list[str], negatives: list[list[str]]) -> torch.Tensor:
        """(B, K-1) cosine similarity of each negative to its row's ground truth."""
        B = len(ground_truths)
        n = len(negatives[0]) if negatives else 0
        if any(len(row) != n for row in negatives) or len(negatives) != B:
            raise ValueError("every example needs the same number of negatives")
        emb = self.embed(list(ground_truths) + [t for row in negatives for t in row])
        gt, neg = emb[:B], emb[B:].view(B, n, -1)  # (B, H), (B, K-1, H)
        return torch.nn.functional.cosine_similarity(neg, gt.unsqueeze(1), dim=-1)

    def rank(self, ground_truths: list[str], negatives: list[list[str]]) -> torch.Tensor:
        """(B, K) rankings: column 0 (the ground truth) first, then negatives 1..K-1 by decreasing similarity
        to it, ties in column order (a stable sort)."""
        return ranking_from_similarities(self.similarities(ground_truths, negatives))


def ranking_from_similarities(similarities: torch.Tensor) -> torch.Tensor:
    """(B, K-1) similarities -> (B, K) column indices, 0 first, then 1 + the negatives by decreasing similarity."""
    order = torch.sort(similarities, dim=-1, descending=True, stable=True).indices + 1  # (B, K-1)
    return torch.cat([torch.zeros(len(order), 1, dtype=torch.long), order], dim=1)
