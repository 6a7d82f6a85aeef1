"""The RAG-Token likelihood of given answers by teacher forcing: training and scoring share it.

For a question x, documents z_1..z_k with prior p(z|x) and an answer y (Lewis et al. 2020):

    log p(y | x) = sum_t logsumexp_z [ log p(z|x) + log p(y_t | x, z, y_<t) ]

the same per-token marginal the generator decodes with (generator.marginalise), so a model
trained on it is trained for the way it is served. All (answer, document) rows run as ONE
forward pass of a causal LM: each row is the generator's own prompt for one document
(RagTokenGenerator.encode), left-padded so every prompt ends in the same column, followed by
the answer's tokens (right-padded). Only the answer positions' logits are computed
(`logits_to_keep`), so the vocabulary projection costs T columns, not the whole prompt.

Used by `qaserve train-generator` (the loss, with gradients) and by generative scoring of
reader spans (no gradients: wrap the call in torch.inference_mode()).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RagTokenScores:
    """Teacher-forced log-likelihoods of G answers, each over its k documents."""

    token_logprobs: torch.Tensor  # (G, T) marginal log p(y_t | x, y_<t); 0 past an answer's end
    doc_logprobs: torch.Tensor  # (G, k, T) log p(y_t | x, z, y_<t); 0 past an answer's end
    mask: torch.Tensor  # (G, T) bool: position t is a token of answer g
    log_prior: torch.Tensor  # (G, k) log p(z|x)

    @property
    def sequence_logprob(self) -> torch.Tensor:
        """(G,) log p(y | x): the sum of the per-token marginals."""
        return self.token_logprobs.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """(G,) answer lengths in tokens."""
        return self.mask.sum(-1)

    def document_contributions(self) -> torch.Tensor:
        """(G, k) posterior p(z | x, y) under the token-wise model: which documents the answer
        came from (the grounding a generated answer reports)."""
        joint = self.log_prior.unsqueeze(-1) + self.doc_logprobs  # (G, k, T)
        post = torch.softmax(joint, dim=1) * self.mask.unsqueeze(1)
        return post.sum(-1) / self.lengths.clamp(min=1).unsqueeze(-1)


def rag_token_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    log_prior: torch.Tensor,
    pad_id: int,
) -> RagTokenScores:
    """Teacher-forced RAG-Token log-likelihoods of `targets` in one batched forward pass.

    prompts: the token ids of the prompt for each (answer, document) row, answer-major:
        row g * k + j is answer g's document j (G * k rows); or just k rows when every
        answer is scored against the same documents (they are repeated G times).
    targets: G answers' token ids, each ending with the token that ends the answer
        (answer_ids builds them); none may be empty.
    log_prior: (G, k) or (k,) log p(z|x) (RagTokenGenerator.log_prior).
    Causal LMs only; seq2seq models raise NotImplementedError.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("RAG-Token teacher forcing supports causal LMs only (for now)")
    if not targets or any(len(t) == 0 for t in targets):
        raise ValueError("every target needs at least one token")
    n_targets = len(targets)
    if log_prior.dim() == 1:
        log_prior = log_prior.unsqueeze(0).expand(n_targets, -1)
    k = log_prior.shape[1]
    if log_prior.shape[0] != n_targets:
        raise ValueError(f"log_prior has {log_prior.shape[0]} rows for {n_targets} targets")
    if len(prompts) == k and n_targets > 1:
        prompts = [p for _ in range(n_targets) for p in prompts]
    if len(prompts) != n_targets * k or any(len(p) == 0 for p in prompts):
        raise ValueError(f"need {n_targets} x {k} non-empty prompts, got {len(prompts)}")

    device = next(model.parameters()).device
    rows = len(prompts)
    width_p = max(len(p) for p in prompts)
    width_t = max(len(t) for t in targets)
    ids = torch.full((rows, width_p + width_t), pad_id, dtype=torch.long)
    attn = torch.zeros((rows, width_p + width_t), dtype=torch.long)
    labels = torch.zeros((rows, width_t), dtype=torch.long)
    mask = torch.zeros((n_targets, width_t), dtype=torch.bool)
    for g, target in enumerate(targets):
        mask[g, : len(target)] = True
        for j in range(k):
            r = g * k + j
            p = prompts[r]
            ids[r, width_p - len(p) : width_p] = torch.as_tensor(p, dtype=torch.long)
            ids[r, width_p : width_p + len(target)] = torch.as_tensor(target, dtype=torch.long)
            attn[r, width_p - len(p) : width_p + len(target)] = 1
            labels[r, : len(target)] = torch.as_tensor(target, dtype=torch.long)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, positions = ids.to(device), attn.to(device), positions.to(device)
    labels, mask = labels.to(device), mask.to(device)

    # The logits at columns width_p - 1 .. width_p + width_t - 2 predict the target tokens.
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = width_t + 1
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False, **kwargs
    )
    logits = out.logits[:, -(width_t + 1) : -1, :].float()  # (rows, T, V)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    doc = logprobs.view(n_targets, k, width_t) * mask.unsqueeze(1)
    lp = log_prior.to(device=device, dtype=doc.dtype)
    marginal = torch.logsumexp(doc + lp.unsqueeze(-1), dim=1) * mask  # (G, T)
    return RagTokenScores(token_logprobs=marginal, doc_logprobs=doc, mask=mask, log_prior=lp)


def answer_ids(generator: Any, text: str) -> list[int]:
    """The tokens a generator emits for `text` as its whole answer, end-of-answer included.

    A chat model's answer ends with the template's end-of-turn marker (the token
    RagTokenGenerator stops on); the suffix is read off the template itself by rendering
    the conversation with and without the assistant's turn. Without a template: `text` and EOS.
    """
    tokenizer = generator.tokenizer
    if getattr(generator, "kind", "causal") != "causal":
        raise NotImplementedError("answer_ids supports causal LMs only (for now)")
    end = ""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00ANSWER\x00"
        messages = [{"role": "user", "content": "q"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": marker}], tokenize=False
        )
        if full.startswith(prompt) and marker in full:
            end = full[len(prompt) :].split(marker, 1)[1].rstrip()
    if not end:
        end = tokenizer.eos_token or ""
    ids = list(tokenizer(text + end, add_special_tokens=False)["input_ids"])
    stops = set(generator.eos_token_ids)
    # The answer must end on a token the generator stops on, else it would run on.
    if not ids or ids[-1] not in stops:
        ids.append(min(stops))
    return ids
