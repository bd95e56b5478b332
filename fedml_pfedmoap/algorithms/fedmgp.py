"""FedMGP (Bo et al., NeurIPS 2025): G groups of shallow text and visual prompts per client, a diversity term between
the groups, similarity-guided probabilistic selection of k groups per modality and rank-aligned aggregation
(docs/algorithms.md §FedMGP).

Group g has a text ctx T_g (replacing the "a photo" of "a photo of a {name}.") and a visual prompt V_g, appended after
the positional embedding (no positional embedding of its own, ln_pre per token) and run through the whole ViT. Logits
ℓ_g = s·f̂_g·t̂_gᵀ; loss (1/G)·Σ_g CE(ℓ_g, y) + λ·Div; inference averages the G logits. After training each client
draws k groups per modality (similarity to the previous round's global slots, softmax(s/τ), sequential draws without
replacement; the draw order is the rank); slot r is the average of the rank-r uploads and overwrites the group each
participant selected at rank r. The image tower's input tokens (ln_pre of class + patch tokens) are cached.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.backbone import ClipBackbone
from ..clip.prompt import TextEncoder
from ..clip.towers import require_vit, visual_from_stream
from ..federated.features import Batch, FeatureSet
from ..seeding import make_generator
from .promptfl import fedavg
from .protocol import Algorithm, EvalResult, PromptParams, Runtime, register_algorithm, score_split
from .text_paths import EncoderCache
from .training import fit_one

MODALITIES = ("text", "vis")


def select_groups(prompts: torch.Tensor, slots: Optional[torch.Tensor], k: int, tau: float,
                  gen: torch.Generator) -> List[int]:
    """k group indices in rank order: without global slots a random permutation's first k; else sequential draws
    without replacement from softmax(s/τ) renormalised over the remaining groups, s_i = max_r cos(P_i, slot_r)."""
    if slots is None:
        return torch.randperm(prompts.shape[0], generator=gen)[:k].tolist()
    sim = F.cosine_similarity(prompts.flatten(1).double()[:, None], slots.flatten(1).double()[None], dim=-1)
    p = torch.softmax(sim.max(dim=1).values / tau, dim=0)
    remaining, chosen = list(range(prompts.shape[0])), []
    for _ in range(k):
        q = p[remaining] / p[remaining].sum()
        chosen.append(remaining.pop(int(torch.multinomial(q, 1, generator=gen))))
    return chosen


def mean_pair_l1(x: torch.Tensor) -> torch.Tensor:
    """x (G, N, D): mean over N and over pairs i < j of mean_dim |x_i − x_j|."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return (x[i] - x[j]).abs().mean()


@dataclass
class FedMGPParams(PromptParams):
    lr: float = 0.001
    epochs: Optional[int] = 2
    groups: int = 5  # G prompt groups per modality
    visual_ctx: int = 2  # visual prompt tokens per group
    topk: int = 2  # k groups per modality selected and aggregated
    temperature: float = 1.0  # τ of the selection softmax
    div_weight: float = 1.0  # λ
    div_sign: str = "repulsive"  # repulsive: minimising Div drives the groups apart | as_released: attractive
    ctx_init: str = "a photo"  # the learnable text tokens' initial words (their count is the text ctx length)
    fixed_text: str = "of a"  # fixed words between the ctx and the class name
    token_cache_gb: Optional[float] = 16.0  # budget of the cached image tokens (train + test); above it: on the fly
    parity_unweighted_mean: bool = False  # released code: slots are the unweighted mean over participants

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "algorithm_args.fedmgp"
        if self.div_sign not in ("repulsive", "as_released"):
            raise ValueError(f"{where}.div_sign: expected 'repulsive' or 'as_released', got {self.div_sign!r}")
        if self.topk > self.groups:
            raise ValueError(f"{where}: expected topk <= groups, got topk={self.topk}, groups={self.groups}")
        if self.dp is not None:
            raise ValueError(f"{where}.dp: differential privacy is not implemented for FedMGP; remove the dp key")


@torch.no_grad()
def init_text_ctx(backbone: ClipBackbone, words: str) -> torch.Tensor:
    """The token embeddings of ``words`` (n, W), without SOT/EOT."""
    enc = TextEncoder(backbone, [words], n_ctx=1)
    tokens = enc.tokens[0]
    n = int(enc.eot[0]) - 1 - 2  # between SOT and EOT, less the placeholder and the period
    return backbone.model.token_embedding(tokens[2:2 + n].to(backbone.model.token_embedding.weight.device)).float()


class FedMGPModel(nn.Module):
    """G text and visual prompt groups on the frozen towers; the image side starts from the cached ln_pre tokens."""

    def __init__(self, rt: Runtime, hp: FedMGPParams, text: torch.Tensor, vis: torch.Tensor) -> None:
        super().__init__()
        self.rt, self.hp = rt, hp
        self.text = nn.Parameter(text.detach().clone().float().to(rt.device))  # (G, n_t, W_t)
        self.vis = nn.Parameter(vis.detach().clone().float().to(rt.device))  # (G, n_v, W_v)
        self.encoder = rt.text  # FedMGP's group encoder (``FedMGP.rt``; inside ``over_classes``: the evaluated names)
        if self.encoder.n_ctx != self.text.shape[1] or getattr(self.encoder, "fixed", "") != hp.fixed_text.strip():
            raise ValueError(f"FedMGPModel: the runtime's text path is not FedMGP's group encoder ({self.text.shape[1]} "
                             f"ctx tokens, then {hp.fixed_text!r}); build the model on FedMGP(...).rt")

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.text, self.vis], "lr": hp.lr}]

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.encoder.features(self.text).float(), dim=-1)  # (G, C, D)

    def image_features(self, tokens: Any) -> torch.Tensor:
        """(G, B, D): every group's prompt tokens (ln_pre applied per token) appended, the whole tower run once."""
        if hasattr(tokens, "materialize"):  # over the token_cache_gb budget (features.LazyPatches)
            tokens = tokens.materialize()
        tokens = tokens.float()
        g, b = self.vis.shape[0], tokens.shape[0]
        prompts = self.rt.backbone.model.visual.ln_pre(self.vis)  # (G, n_v, W)
        x = torch.cat([tokens.unsqueeze(0).expand(g, *tokens.shape),
                       prompts.unsqueeze(1).expand(g, b, *prompts.shape[1:])], dim=2)
        out = visual_from_stream(self.rt.backbone, x.reshape(g * b, *x.shape[2:]), 0)
        return F.normalize(out.reshape(g, b, -1), dim=-1)

    def group_logits(self, batch: Batch, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.image_features(batch.patches)
        return self.rt.logit_scale * torch.einsum("gbd,gcd->gbc", img, text), img

    def loss(self, batch: Batch) -> torch.Tensor:
        text = self.text_features()
        logits, img = self.group_logits(batch, text)
        ce = torch.stack([F.cross_entropy(lg, batch.labels) for lg in logits]).mean()
        if self.hp.div_weight == 0 or self.text.shape[0] < 2:
            return ce
        d = -(mean_pair_l1(text) + mean_pair_l1(img)) / 2  # both ≤ 0: minus the mean pairwise distance
        div = d.abs() if self.hp.div_sign == "as_released" else d
        return ce + self.hp.div_weight * div


@register_algorithm("fedmgp")
class FedMGP(Algorithm):
    """Prompt groups per client; k groups per modality selected, rank-aligned averaging into k global slots."""

    Params = FedMGPParams

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        self.n_text_ctx = len(init_text_ctx(runtime.backbone, self.hp.ctx_init))
        self.encoders = EncoderCache(runtime)
        self.rt = dataclasses.replace(runtime, text=self.text_over(runtime.text))

    def text_over(self, text: TextEncoder) -> TextEncoder:
        """The group encoder ("X … X {fixed_text} {name}.", one X per word piece of ``ctx_init``) over ``text``'s
        class names: the run's, or the novel ones inside ``over_classes``."""
        return self.encoders.get(self.n_text_ctx, text.classnames, fixed=self.hp.fixed_text)

    @classmethod
    def stream_block_for(cls, backbone: ClipBackbone, hp: FedMGPParams) -> int:
        """Cache the ln_pre output of the class and patch tokens (before block 1); ResNet: an error."""
        require_vit(backbone, cls.name)
        return 0

    def initial_groups(self) -> Dict[str, torch.Tensor]:
        """The common init: "a photo" embeddings + 0.01·N(0,1) per text group, N(0, 0.02²) visual prompts."""
        bb = self.rt.backbone
        require_vit(bb, self.name)
        base = init_text_ctx(bb, self.hp.ctx_init).cpu()
        text = torch.stack([base + 0.01 * torch.randn(base.shape, generator=make_generator(self.rt.seed,
                                                                                          "fedmgp-text", g))
                            for g in range(self.hp.groups)])
        width = int(bb.model.visual.transformer.width)
        vis = 0.02 * torch.randn(self.hp.groups, self.hp.visual_ctx, width,
                                 generator=make_generator(self.rt.seed, "fedmgp-visual"))
        return {"text": text, "vis": vis}

    # ---- server
    def init_server(self) -> None:
        super().init_server()
        self.history: Dict[int, Dict[str, torch.Tensor]] = {}  # round -> its k global slots per modality
        self.last_round: Dict[int, int] = {}  # client -> the last round its upload was aggregated in

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        """The latest slots (selection similarities) and, for a client whose last aggregated round is older, that
        round's slots (its write-back)."""
        out = super().client_payload(client_id)
        if self.history:
            latest = max(self.history)
            out.update({f"{m}_slots": self.history[latest][m].clone() for m in MODALITIES}, slots_round=latest)
            mine = self.last_round.get(int(client_id))
            if mine is not None:
                out["aggregated_round"] = mine
            if mine is not None and mine != latest:
                out.update({f"{m}_writeback": self.history[mine][m].clone() for m in MODALITIES})
        return out

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        ups = [u for u in uploads if "text_slots" in u]
        if not ups:
            return
        self.history[self.round] = rank_aligned_slots(ups, self.hp.topk, self.hp.parity_unweighted_mean)
        self.last_round.update({int(u["client_index"]): self.round for u in ups})
        keep = set(self.last_round.values()) | {self.round}
        self.history = {r: v for r, v in self.history.items() if r in keep}

    def server_state(self) -> Dict[str, Any]:
        return {**super().server_state(), "history": {str(r): v for r, v in self.history.items()},
                "last_round": {str(c): r for c, r in self.last_round.items()}}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        super().load_server_state(state)
        self.history = {int(r): {m: t.clone() for m, t in v.items()} for r, v in state["history"].items()}
        self.last_round = {int(c): int(r) for c, r in state["last_round"].items()}

    # ---- client
    def init_client_state(self, client_id: int) -> Dict[str, Any]:
        return {**self.initial_groups(), "selected_round": -1}

    @staticmethod
    def written_back(payload: Dict[str, Any], state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The client's groups with the slots of the round it last selected in written into the selected groups
        (rank r -> slot r); unchanged when that round's slots are not in the payload (its upload was not aggregated)."""
        groups = {m: state[m].clone() for m in MODALITIES}
        if state.get("selected_round", -1) < 0 or payload.get("aggregated_round") != state["selected_round"]:
            return groups
        key = "writeback" if "text_writeback" in payload else "slots"
        for m in MODALITIES:
            groups[m][state[f"{m}_selected"]] = payload[f"{m}_{key}"].to(groups[m].dtype)
        return groups

    def local_train(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> Dict[str, Any]:
        groups = self.written_back(payload, state)
        model = FedMGPModel(self.rt, self.hp, groups["text"], groups["vis"])
        loss = fit_one(self, model, payload, data)
        up: Dict[str, Any] = {"client_index": payload["client_index"], "n": len(data), "metrics": {"train_loss": loss}}
        for m, param in (("text", model.text), ("vis", model.vis)):
            trained = param.detach().cpu().clone()
            gen = make_generator(self.rt.seed, "fedmgp-select", m, payload["client_index"], payload["round"])
            sel = select_groups(trained, payload.get(f"{m}_slots"), self.hp.topk, self.hp.temperature, gen)
            state[m], state[f"{m}_selected"] = trained, torch.tensor(sel, dtype=torch.long)
            up[f"{m}_slots"] = trained[sel]
        state["selected_round"] = int(payload["round"])
        return up

    @torch.no_grad()
    def eval_logits(self, payload: Dict[str, Any], state: Dict[str, Any], batch: Batch) -> torch.Tensor:
        """The mean of the G groups' logits (also compared across the two paths of ``pfedmoap-bench perf``)."""
        model = self._eval_model(payload, state)
        return model.group_logits(batch, model.text_features())[0].mean(0)

    def _eval_model(self, payload: Dict[str, Any], state: Dict[str, Any]) -> FedMGPModel:
        groups = self.written_back(payload, state)
        return FedMGPModel(self.rt, self.hp, groups["text"], groups["vis"])

    @torch.no_grad()
    def evaluate(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> EvalResult:
        model = self._eval_model(payload, state)
        text = model.text_features()
        return score_split(lambda batch: model.group_logits(batch, text)[0].mean(0), data, self.rt.eval_batch_size)


def rank_aligned_slots(uploads: Sequence[Dict[str, Any]], k: int, unweighted: bool) -> Dict[str, torch.Tensor]:
    """Slot r of each modality: the (sample-weighted, or unweighted) mean of the participants' rank-r uploads."""
    w = [1.0 if unweighted else u["n"] for u in uploads]
    return {m: torch.stack([fedavg([u[f"{m}_slots"][r] for u in uploads], w) for r in range(k)]) for m in MODALITIES}
