"""Prima's study encoder (hierarchical ViT) and heads, with the reference's state-dict layout.

Per series: [20 registers | series-name vector | tokens] -> ``innerViT`` -> registers -> ``mlp_head`` -> series
embedding (1024). Per study: [10 registers | study-description vector | series embeddings] -> ``outerViT`` ->
registers, LayerNorm each, flattened -> study embedding (10240, not normalised). Heads read that embedding:
52 diagnosis MLPs (``m1`` in the reference), referral MLPs (``m2``) and a priority head. ``reference/prima.md``
§4-6 give the shapes; :data:`PRIMA_CONFIGS` holds ``full`` (the published sizes) and ``tiny`` (same structure,
small widths, for tests and the demo) as data for one code path.

Series order inside a study does not matter: neither ViT has a positional embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from models.heads import StackedMLPHeads, mlp
from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS
from models.text_encoder import CharacterTransformerEncoder, PretrainedNameEncoder, texts_to_tensor
from models.tokenizer import TOKEN_FEATURES
from models.transformer import RegisterViT


@dataclass(frozen=True)
class ViTConfig:
    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_dim: int
    registers: int
    out_dim: int


@dataclass(frozen=True)
class TextEncoderConfig:
    dim: int = 256
    depth: int = 3
    heads: int = 4
    dim_head: int = 64
    mlp_dim: int = 300


@dataclass(frozen=True)
class PrimaConfig:
    inner: ViTConfig  # series ViT; its dim is the token width
    outer: ViTConfig  # study ViT
    text: TextEncoderConfig  # series-name and study-description encoders
    # "A": pre-trained text encoder + Linear (keys serieencoder.0/1); "B": one encoder (serieencoder.*)
    series_name_variant: str = "A"
    variant_a_text_out: int = 128  # width of variant A's unused inner ``linear`` (kept for strict loading)
    diagnosis_hidden: tuple[int, ...] = (4000, 1000)
    referral_hidden: tuple[int, ...] = (4000, 1000)
    priority_hidden: tuple[int, ...] = (4000, 1000)  # the published priority head's layout is unverified

    @property
    def embedding_dim(self) -> int:
        return self.outer.registers * self.outer.dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PrimaConfig:
        values = dict(data)
        values["inner"] = ViTConfig(**values["inner"])
        values["outer"] = ViTConfig(**values["outer"])
        values["text"] = TextEncoderConfig(**values["text"])
        for key in ("diagnosis_hidden", "referral_hidden", "priority_hidden"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


PRIMA_CONFIGS: dict[str, PrimaConfig] = {
    "full": PrimaConfig(
        inner=ViTConfig(
            dim=TOKEN_FEATURES, depth=15, heads=16, dim_head=64, mlp_dim=1024, registers=20, out_dim=1024
        ),
        outer=ViTConfig(dim=1024, depth=4, heads=8, dim_head=64, mlp_dim=1024, registers=10, out_dim=128),
        text=TextEncoderConfig(),
    ),
    "tiny": PrimaConfig(
        inner=ViTConfig(
            dim=TOKEN_FEATURES, depth=2, heads=2, dim_head=32, mlp_dim=128, registers=4, out_dim=64
        ),
        outer=ViTConfig(dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128, registers=2, out_dim=32),
        text=TextEncoderConfig(dim=64, depth=1, heads=2, dim_head=32, mlp_dim=64),
        variant_a_text_out=32,
        diagnosis_hidden=(64, 32),
        referral_hidden=(64, 32),
        priority_hidden=(64, 32),
    ),
}


@dataclass
class PrimaBatch:
    """Model input for B studies with S series in all, zero-padded.

    ``series_study[s]`` / ``series_slot[s]``: which study series s belongs to and its place among that study's
    series. Build with :meth:`from_studies`.
    """

    tokens: torch.Tensor  # (S, longest series, 289)
    token_counts: torch.Tensor  # (S,)
    name_ids: torch.Tensor  # (S, longest name + 1)
    series_study: torch.Tensor  # (S,)
    series_slot: torch.Tensor  # (S,)
    description_ids: torch.Tensor  # (B, longest description + 1)
    series_uids: list[str] = field(default_factory=list)

    @property
    def n_studies(self) -> int:
        return self.description_ids.shape[0]

    @classmethod
    def from_studies(
        cls,
        studies: Sequence[Sequence[tuple[torch.Tensor, str]]],
        descriptions: Sequence[str],
        series_uids: Sequence[str] = (),
    ) -> PrimaBatch:
        """``studies[b]`` = [(tokens (K, 289), series name), ...]; one description per study."""
        if len(descriptions) != len(studies):
            raise ValueError(f"{len(studies)} studies but {len(descriptions)} descriptions")
        if any(len(series) == 0 for series in studies):
            raise ValueError("every study needs at least one series with tokens")
        flat = [
            (tokens, name, b, slot)
            for b, series in enumerate(studies)
            for slot, (tokens, name) in enumerate(series)
        ]
        longest = max(tokens.shape[0] for tokens, *_ in flat)
        first = flat[0][0]
        padded = first.new_zeros(len(flat), longest, first.shape[1])
        for s, (tokens, *_) in enumerate(flat):
            padded[s, : tokens.shape[0]] = tokens
        device = first.device
        return cls(
            tokens=padded,
            token_counts=torch.tensor([t.shape[0] for t, *_ in flat], device=device),
            name_ids=texts_to_tensor([name for _, name, *_ in flat]).to(device),
            series_study=torch.tensor([b for *_, b, _ in flat], device=device),
            series_slot=torch.tensor([slot for *_, slot in flat], device=device),
            description_ids=texts_to_tensor(list(descriptions)).to(device),
            series_uids=list(series_uids),
        )


class HierViT(nn.Module):
    """Series ViT under a study ViT. Keys: innerViT.*, outerViT.*, serieencoder.*, studyencoder.*."""

    def __init__(self, config: PrimaConfig) -> None:
        super().__init__()
        inner, outer, text = config.inner, config.outer, config.text
        self.innerViT = _register_vit(inner)
        self.outerViT = _register_vit(outer)
        text_args = asdict(text)
        if config.series_name_variant == "A":
            self.serieencoder: nn.Module = PretrainedNameEncoder(
                CharacterTransformerEncoder(config.variant_a_text_out, **text_args), inner.dim
            )
        elif config.series_name_variant == "B":
            self.serieencoder = CharacterTransformerEncoder(inner.dim, **text_args)
        else:
            raise ValueError(f"series_name_variant must be 'A' or 'B', not {config.series_name_variant!r}")
        self.studyencoder = CharacterTransformerEncoder(outer.dim, **text_args)

    def series_embeddings(self, batch: PrimaBatch) -> torch.Tensor:
        """(S, inner out_dim): each series' [name | tokens] through the series ViT and its head."""
        names = self.serieencoder(batch.name_ids).to(batch.tokens.dtype)
        sequences = torch.cat([names[:, None, :], batch.tokens], dim=1)
        return self.innerViT.head(self.innerViT(sequences, batch.token_counts + 1))

    def study_embeddings(
        self,
        series: torch.Tensor,
        series_study: torch.Tensor,
        series_slot: torch.Tensor,
        description_ids: torch.Tensor,
    ) -> torch.Tensor:
        """(S, inner out_dim) series embeddings, each placed in its study and slot -> (B, embedding) studies."""
        n_studies = description_ids.shape[0]
        description = self.studyencoder(description_ids).to(series.dtype)
        counts = torch.bincount(series_study, minlength=n_studies)
        sequences = series.new_zeros(n_studies, 1 + int(counts.max()), series.shape[1])
        sequences[:, 0] = description
        sequences[series_study, 1 + series_slot] = series
        return self.outerViT(sequences, counts + 1)

    def forward(self, batch: PrimaBatch) -> torch.Tensor:
        """(B, outer registers * outer dim) study embeddings."""
        return self.study_embeddings(
            self.series_embeddings(batch), batch.series_study, batch.series_slot, batch.description_ids
        )


def _register_vit(config: ViTConfig) -> RegisterViT:
    return RegisterViT(
        config.dim,
        config.depth,
        config.heads,
        config.dim_head,
        config.mlp_dim,
        config.registers,
        config.out_dim,
    )


@dataclass
class StudyOutput:
    diagnosis_logits: torch.Tensor  # (B, n_diagnoses): head logit minus its threshold; > 0 means positive
    diagnosis_probs: torch.Tensor  # sigmoid of the above: 0.5 at the operating threshold
    priority_logits: torch.Tensor  # (B, n_priority): raw logits
    referral_logits: torch.Tensor  # (B, n_referrals): logit minus threshold
    embedding: torch.Tensor  # (B, embedding_dim) study embedding ("clip_emb")


class PrimaModel(nn.Module):
    """The whole study model: HierViT + diagnosis, referral and priority heads."""

    def __init__(
        self,
        config: PrimaConfig,
        diagnosis_names: Sequence[str] = DIAGNOSIS_NAMES,
        referral_names: Sequence[str] = REFERRALS,
        priority_classes: Sequence[str] = PRIORITY_CLASSES,
        diagnosis_outputs: int | None = None,
        referral_outputs: int | None = None,
    ) -> None:
        """``*_outputs``: width of each head's last layer (the reference's diagnosis heads have 52 columns each
        and read one); defaults to the number of names."""
        super().__init__()
        if config.inner.dim != TOKEN_FEATURES:
            raise ValueError(
                f"the series ViT's width must be the token width {TOKEN_FEATURES}, not {config.inner.dim}"
            )
        self.config = config
        self.diagnosis_names = tuple(diagnosis_names)
        self.referral_names = tuple(referral_names)
        self.priority_classes = tuple(priority_classes)
        embedding = config.embedding_dim
        self.visual = HierViT(config)
        self.diagnosis_heads = StackedMLPHeads(
            len(self.diagnosis_names),
            embedding,
            config.diagnosis_hidden,
            diagnosis_outputs or len(self.diagnosis_names),
        )
        self.referral_heads = StackedMLPHeads(
            len(self.referral_names),
            embedding,
            config.referral_hidden,
            referral_outputs or len(self.referral_names),
        )
        self.priority_head = mlp(embedding, config.priority_hidden, len(self.priority_classes))

    def heads(self, embedding: torch.Tensor) -> StudyOutput:
        diagnosis = self.diagnosis_heads(embedding).float()
        return StudyOutput(
            diagnosis_logits=diagnosis,
            diagnosis_probs=torch.sigmoid(diagnosis),
            priority_logits=self.priority_head(embedding).float(),
            referral_logits=self.referral_heads(embedding).float(),
            embedding=embedding.float(),
        )

    def forward(self, batch: PrimaBatch) -> StudyOutput:
        return self.heads(self.visual(batch))


# --- checkpoint adaptation (timm's checkpoint_filter_fn idea): reference state dict -> ours ---------------------

_REFERENCE_PREFIXES = (
    ("clipvisualmodel.", "visual."),
    ("m1.", "diagnosis_heads."),
    ("m2.", "referral_heads."),
    ("priorityhead.", "priority_head."),
)
_TRAINING_ONLY = ("clipmodel.", "visual.patdisnet.", "visual.dummy_param")


def convert_reference_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict of the reference FullMRIModel (exported from its pickle) -> :class:`PrimaModel` keys.

    Drops the text tower and its duplicate view of the HierViT (``clipmodel.*``), the patient-discrimination
    net and ``dummy_param``, which inference does not use.
    """
    converted = {}
    for key, value in state.items():
        for old, new in _REFERENCE_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        if not key.startswith(_TRAINING_ONLY):
            converted[key] = value
    return converted


def series_name_variant(state: Mapping[str, torch.Tensor], prefix: str = "visual.") -> str:
    """Which series-name encoder layout ("A" or "B") a state dict holds (``reference/prima.md`` §4)."""
    if f"{prefix}serieencoder.0.embed.weight" in state:
        return "A"
    if f"{prefix}serieencoder.embed.weight" in state:
        return "B"
    raise KeyError(f"no series-name encoder under {prefix}serieencoder in the state dict")
