"""HF safetensors in and out, checked against transformers' own LlamaForCausalLM."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.dist_utils import run_distributed
from tests.hf_utils import save_random_llama
from tests.script_utils import load_script
from titan_cp.checkpoint import hf
from titan_cp.checkpoint.hf import check_hf_config_matches, export_hf, load_hf_model, load_hf_weights
from titan_cp.errors import UserError
from titan_cp.models.llama3 import Transformer


SEQ = 40  # longer than original_max_position_embeddings, so the llama3 rope scaling matters
VOCAB = 67  # odd, so FSDP's dim-0 shards are uneven (34 + 33 rows)


def _save_hf_model(folder: Path, tied: bool, **save_kwargs) -> torch.nn.Module:
    return save_random_llama(
        folder, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        rope_theta=500000.0, tied=tied, **save_kwargs,
    )  # fmt: skip


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    model = _save_hf_model(folder, tied=request.param)
    return folder, model


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_load_hf_model_matches_transformers(hf_model):
    folder, reference = hf_model
    model = load_hf_model(folder)
    assert model.args.tie_word_embeddings == reference.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(_tokens())
    assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, _hf_logits(reference), rtol=0, atol=1e-5)


def test_load_and_export_see_through_activation_checkpoint_wrappers(hf_model, tmp_path):
    # The wrapper activation checkpointing uses (torchtitan style); it adds a level to parameter names.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    folder, reference = hf_model
    args = hf.load_hf_args(folder)
    with torch.device("meta"):
        model = Transformer(args)
    for name, layer in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(layer)
    model.to_empty(device="cpu")
    load_hf_weights(model, folder)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), _hf_logits(reference), rtol=0, atol=1e-5)
    export_hf(model, args, tmp_path / "export")
    assert load_file(tmp_path / "export" / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()


def test_sharded_checkpoint_with_index_loads(tmp_path):
    reference = _save_hf_model(tmp_path, tied=False, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path)(_tokens()), _hf_logits(reference), rtol=0, atol=1e-5)


def test_export_reloads_in_transformers_with_identical_tensors(hf_model, tmp_path):
    folder, reference = hf_model
    model = load_hf_model(folder)
    out = tmp_path / "export"
    export_hf(model, model.args, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["rope_scaling"]["rope_type"] == "llama3"
    import transformers

    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings == reference.config.tie_word_embeddings
    original, back = reference.state_dict(), reloaded.state_dict()
    assert original.keys() == back.keys()
    for name in original:
        assert torch.equal(original[name], back[name]), name
    torch.testing.assert_close(_hf_logits(reloaded), _hf_logits(reference), rtol=0, atol=0)


def test_export_shards_large_models_with_an_index(hf_model, tmp_path):
    folder, _ = hf_model
    model = load_hf_model(folder)
    out = tmp_path / "export"
    export_hf(model, model.args, out, dtype=torch.bfloat16, max_shard_bytes=8_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_hf_model(out)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], param.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_export_never_leaves_a_half_written_folder(hf_model, tmp_path, monkeypatch):
    folder, _ = hf_model
    model = load_hf_model(folder)
    out = tmp_path / "export"
    export_hf(model, model.args, out)
    before = _folder_digest(out)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(UserError, match="write failed"):
        export_hf(model, model.args, out)
    assert _folder_digest(out) == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # and no temporary folder is left

    monkeypatch.undo()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to overwrite"):
        export_hf(model, model.args, precious)
    assert (precious / "todo.txt").read_text() == "keep me"


def _copy(folder: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    return bad


def _rewrite(bad: Path, change) -> None:
    tensors = load_file(bad / "model.safetensors")
    change(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})


def _drop_tensor(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _reshape_tensor(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)


def _add_tensor(tensors):
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_tensor, r"bad: missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        (
            _reshape_tensor,
            r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \[8, 32\], expected \[16, 32\]",
        ),
        (_add_tensor, r"model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'"),
    ],
    ids=["dropped", "reshaped", "unexpected"],
)
def test_bad_tensors_give_one_line_naming_the_tensor(hf_model, tmp_path, change, message):
    bad = _copy(hf_model[0], tmp_path)
    _rewrite(bad, change)
    before = _folder_digest(bad)
    with pytest.raises(UserError, match=message) as error:
        load_hf_model(bad)
    assert "\n" not in str(error.value)
    assert _folder_digest(bad) == before  # a failed load writes nothing


def test_truncated_safetensors_file(hf_model, tmp_path):
    bad = _copy(hf_model[0], tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model.safetensors: unreadable or truncated safetensors file") as error:
        load_hf_model(bad)
    assert "\n" not in str(error.value)
    assert (bad / "model.safetensors").stat().st_size == len(data) // 2


def test_config_that_is_not_a_llama(hf_model, tmp_path):
    bad = _copy(hf_model[0], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match=r"config.json: field 'model_type' is 'mistral'"):
        load_hf_model(bad)
    with pytest.raises(UserError, match=r"missing; a Hugging Face model folder needs config.json"):
        load_hf_model(tmp_path)


def test_config_fields_checked_against_a_flavor(hf_model):
    folder, _ = hf_model
    args = load_hf_model(folder).args
    check_hf_config_matches(folder, args)
    with pytest.raises(UserError, match=r"field 'num_hidden_layers' is 2 but the model being trained has 3"):
        check_hf_config_matches(folder, dataclasses.replace(args, n_layers=3))
    with pytest.raises(UserError, match=r"field 'rope_scaling'"):
        check_hf_config_matches(folder, dataclasses.replace(args, rope_scaling=None))


def _fsdp_load_and_export(rank: int, world_size: int, jobs: list[tuple[str, str]]) -> list:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard_cp",))
    results = []
    for folder, out in jobs:
        args = hf.load_hf_args(folder)
        with torch.device("meta"):
            model = Transformer(args)
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        model.init_weights()  # in-place init on sharded DTensors (overwritten by the load below)
        load_hf_weights(model, folder)
        embedding = model.tok_embeddings.weight
        assert isinstance(embedding, DTensor) and embedding.to_local().shape[0] == (34, 33)[rank]
        if args.tie_word_embeddings:
            assert model.output.weight is embedding
        with torch.no_grad():
            logits = model(_tokens())
        export_hf(model, args, out)
        results.append(logits.tolist())  # plain values: tensors would travel through a dead process's shared memory
    return results


def test_fsdp_sharded_load_and_export_match_transformers(tmp_path):
    references = {tied: _save_hf_model(tmp_path / f"hf-{tied}", tied) for tied in (False, True)}
    jobs = [(str(tmp_path / f"hf-{tied}"), str(tmp_path / f"export-{tied}")) for tied in references]
    per_rank = run_distributed(_fsdp_load_and_export, 2, jobs)
    for job_index, (tied, reference) in enumerate(references.items()):
        for rank_results in per_rank:
            torch.testing.assert_close(torch.tensor(rank_results[job_index]), _hf_logits(reference), rtol=0, atol=1e-5)
        original = reference.state_dict()
        exported = load_file(tmp_path / f"export-{tied}" / "model.safetensors")
        assert exported.keys() == {k for k in original if not (tied and k == "lm_head.weight")}
        for name, tensor in exported.items():
            assert torch.equal(tensor, original[name]), name


def _convert_main():
    return load_script("convert_checkpoint").main


def test_convert_hf_to_dcp_and_back(hf_model, tmp_path, capsys):
    folder, reference = hf_model
    main = _convert_main()
    dcp_dir, hf_dir = tmp_path / "step-0", tmp_path / "hf"
    assert main(["hf-to-dcp", str(folder), str(dcp_dir)]) == 0
    saved = json.loads((dcp_dir / "meta.json").read_text())["model_args"]
    assert saved["tie_word_embeddings"] == reference.config.tie_word_embeddings
    tokenizer = str(Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "tokenizer.json")
    assert main(["dcp-to-hf", str(dcp_dir), str(hf_dir), "--tokenizer", tokenizer, "--dtype", "float32"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in hf_dir.iterdir()}
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(hf_dir).eos_token == "<|end_of_text|>"  # a bare tokenizer.json serves too
    exported, original = load_file(hf_dir / "model.safetensors"), reference.state_dict()
    tied = reference.config.tie_word_embeddings
    assert exported.keys() == {k for k in original if not (tied and k == "lm_head.weight")}
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name

    capsys.readouterr()
    assert main(["dcp-to-hf", str(dcp_dir), str(tmp_path / "other")]) == 2
    assert "dcp-to-hf needs --tokenizer" in capsys.readouterr().err
    assert main(["dcp-to-hf", str(dcp_dir), str(tmp_path / "other"), "--tokenizer", tokenizer, "--flavor", "8B"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tensor 'model.tok_embeddings.weight' has shape [67, 32]" in error
    assert main(["hf-to-dcp", str(folder), str(dcp_dir)]) == 2  # never writes over a checkpoint
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["dcp-to-hf", str(folder), str(tmp_path / "other")]) == 2
    assert "not a DCP checkpoint folder" in capsys.readouterr().err
