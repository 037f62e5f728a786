"""Zero-shot findings from text prompts (models.zero_shot, worker.zero_shot): prompt tables, the text embedding
cache, ranking of a planted case, and the combination with kNN scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from models.gpt2_tokenizer import GPT2Tokenizer
from models.labels import DIAGNOSIS_NAMES
from models.prima import PRIMA_CONFIGS, PrimaModel
from models.prima_text import PRIMA_TEXT_CONFIGS, PrimaTextModel, image_embedding
from models.slice_embedder import SliceEmbedder, load_slice_model
from models.slice_input import series_slices
from models.zero_shot import PromptTable, PromptTableError, TextEmbeddingCache, combine_with_knn
from pacs_bridge.codes import FINDING_CODES
from worker.config import Settings
from worker.zero_shot import PrimaZeroShot, SliceZeroShot, zero_shot_findings


def settings_for(tmp_path: Path) -> Settings:
    settings = Settings()
    settings.var_dir = str(tmp_path / "var")
    settings.slice_evidence.config, settings.slice_evidence.weights = "tiny", ""
    return settings


def picture(name: str) -> np.ndarray:
    slices, problems = series_slices([Path(get_testdata_file(name))], 1)
    assert slices, problems
    return slices[0].pixels


def test_shipped_prompt_tables_cover_every_label_with_several_prompts_and_the_sr_codes_them() -> None:
    prima = PromptTable.load("prima_diagnoses")
    assert prima.label_names == tuple(DIAGNOSIS_NAMES)
    slices = PromptTable.load("slice_findings")
    for table in (prima, slices):
        assert all(len(prompts) >= 2 for prompts in table.labels.values()) and len(table.no_finding) >= 2
    assert set(slices.label_names) <= set(FINDING_CODES)  # every slice finding has an SR code


def test_a_prompt_table_without_no_finding_prompts_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"labels": {"chest_mass": ["x-ray chest mass"]}}))
    with pytest.raises(PromptTableError, match=r"site\.json: 'no_finding'"):
        PromptTable.load(path)


def test_planted_case_ranks_the_prompted_finding_first_and_text_embeddings_are_cached(tmp_path: Path) -> None:
    """A tiny MedImageInsight whose image projection is trained for a few steps on two pydicom-data images: CT_small
    as the planted pneumothorax, MR_small as no finding. The zero-shot scores rank the planted finding first for
    the CT, and not for the MR; the text embeddings are computed once and read back by the next process."""
    settings = settings_for(tmp_path)
    model = load_slice_model(None, "tiny")
    embedder = SliceEmbedder(model)
    zero_shot = SliceZeroShot(settings, embedder)
    classes = zero_shot.class_embeddings()
    target = torch.from_numpy(np.stack([classes.matrix[classes.labels.index("chest_pneumothorax")],
                                        classes.no_finding]))
    from models.slice_input import model_input
    x = model_input([picture("CT_small.dcm"), picture("MR_small.dcm")], model.config.image_size)
    with torch.no_grad():
        features = model.image_features(x)
    projection = model.image_projection
    optimiser = torch.optim.Adam([projection], lr=0.05)
    for _ in range(60):  # contrastive: each image towards its class text, away from the other
        image = torch.nn.functional.normalize(features @ projection, dim=-1)
        loss = torch.nn.functional.cross_entropy(20 * image @ target.T, torch.tensor([0, 1]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    ct = embedder.embed_pictures([picture("CT_small.dcm")])[0]
    mr = embedder.embed_pictures([picture("MR_small.dcm")])[0]
    ct_scores, mr_scores = zero_shot.score(ct), zero_shot.score(mr)

    assert max(ct_scores.zero_shot, key=ct_scores.zero_shot.get) == "chest_pneumothorax"
    assert ct_scores.zero_shot["chest_pneumothorax"] > 0.5 > mr_scores.zero_shot["chest_pneumothorax"]
    findings = zero_shot_findings(ct_scores, threshold=0.5, top_k=1, codable=FINDING_CODES)
    assert findings[0].label == "chest_pneumothorax" and findings[0].positive
    assert zero_shot.cache.misses == 1 and zero_shot.cache.hits == 2
    assert len(list((tmp_path / "var" / "text_embeddings").glob("*.npz"))) == 1

    again = SliceZeroShot(settings, embedder)  # a new process: same weights, same table -> read from disk
    assert again.score(ct).zero_shot == ct_scores.zero_shot
    assert (again.cache.hits, again.cache.misses) == (1, 0)


def test_an_edited_prompt_table_gets_new_text_embeddings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    embedder = SliceEmbedder(load_slice_model(None, "tiny"))
    SliceZeroShot(settings, embedder).class_embeddings()
    table = json.loads((Path(__file__).parents[2] / "models" / "prompts" / "slice_findings.json").read_text())
    table["labels"]["chest_mass"].append("CT chest large mass")
    site = tmp_path / "site.json"
    site.write_text(json.dumps(table))
    settings.zero_shot.slice_prompts = str(site)
    edited = SliceZeroShot(settings, embedder)
    edited.class_embeddings()
    assert edited.cache.misses == 1
    assert len(list((tmp_path / "var" / "text_embeddings").glob("*.npz"))) == 2


def test_knn_scores_are_combined_where_labelled_neighbours_exist_else_zero_shot_alone() -> None:
    combined = combine_with_knn({"chest_mass": 0.8, "chest_nodule": 0.2}, {"chest_mass": 0.0}, knn_weight=0.5)
    assert combined == {"chest_mass": pytest.approx(0.4), "chest_nodule": 0.2}
    with pytest.raises(ValueError, match="knn_weight 1.5"):
        combine_with_knn({}, {}, 1.5)


def test_prima_zero_shot_ranks_the_prompted_diagnosis_first_for_a_planted_study(tmp_path: Path) -> None:
    """Parity-sized random Prima (tiny) and its GPT-2 text tower; the text tower is trained a few steps so that
    one study embedding matches the glioma prompts and not the others; the 52 zero-shot scores then rank glioma first."""
    settings = settings_for(tmp_path)
    torch.manual_seed(0)
    prima = PrimaModel(PRIMA_CONFIGS["tiny"]).eval()
    text = PrimaTextModel(PRIMA_TEXT_CONFIGS["tiny"]).eval()
    study = torch.randn(1, PRIMA_CONFIGS["tiny"].embedding_dim)
    zero_shot = PrimaZeroShot(settings, prima, text, "random-prima-text-tiny", cache=TextEmbeddingCache(tmp_path))
    table = zero_shot.table
    texts = table.texts()  # every prompt: glioma's towards the study, all others away from it
    ids, lengths = GPT2Tokenizer().batch(texts)
    with torch.no_grad():
        image = image_embedding(prima, study)[0]
    target = torch.tensor([1.0 if t in table.labels["tumor_adult_glioma"] else -1.0 for t in texts])
    optimiser = torch.optim.Adam(text.parameters(), lr=0.01)
    for _ in range(60):
        loss = torch.nn.functional.softplus(-target * 10 * (text(ids, lengths) @ image)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    text.eval()

    scores = zero_shot.score(study[0])

    assert len(scores.zero_shot) == 52 and scores.method == "prima-zero-shot"
    assert max(scores.zero_shot, key=scores.zero_shot.get) == "tumor_adult_glioma"
    assert scores.zero_shot["tumor_adult_glioma"] > 0.5


def test_embedder_benchmark_reports_slices_per_second_and_the_text_cache_hit_rate(capsys) -> None:
    from worker.cli import main

    assert main(["bench", "embedder", "--config", "tiny", "--size", "224", "--studies", "10"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "embedder" and result["slices_per_s"] > 0
    assert result["text_cache_misses"] == 1 and result["text_cache_hit_rate"] == 0.9  # one miss in ten studies
