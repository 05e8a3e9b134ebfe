"""`tropd eval` end to end through the real EmbeddedEngine (HF transformers on CPU), the real chat-template path
and the sandbox, on a tiny random Llama with a tiny byte-level BPE tokenizer built here (fast; no hub). The run
with the real SmolLM2-135M-Instruct is the same command with --model <materialize_smollm2 dir>."""
import json

import pytest


def _tiny_model_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megatron_tropd.evaluation.benchmarks import load_benchmark

    texts = [p.code_prompt for p in load_benchmark("humaneval", limit=20).problems]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_tropd_eval_humaneval_with_embedded_engine(tmp_path, capsys):
    import argparse

    from megatron_tropd.cli import SUBCOMMANDS
    from megatron_tropd.evaluation import cli

    assert SUBCOMMANDS["eval"][0] == cli.__name__  # `tropd eval` dispatches to this module's add_arguments/run
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    model = _tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    rc = cli.run(parser.parse_args(["--benchmark", "humaneval", "--model", str(model), "--limit", "2", "--n", "2",
               "--k", "1", "2", "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "5",
               "--out", str(out)]))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "humaneval pass@1 = " in printed and "pass@2" in printed
    rows = [json.loads(line) for line in open(out / "humaneval.results.jsonl")]
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    for r in rows:
        assert r["n"] == 2 and len(r["samples"]) == 2 and r["prompt_tokens"] > 50
        for s in r["samples"]:
            assert 1 <= s["response_tokens"] <= 12 and s["weight_version"] == 0
            assert s["detail"].split()[0] in ("passed", "failed", "timeout")  # scored in the sandbox
    summary = json.load(open(out / "humaneval.summary.json"))
    mean_c = sum(r["n_correct"] for r in rows) / 4
    assert summary["metrics"]["pass@1"] == pytest.approx(mean_c)
    assert summary["engine"] == "embedded" and summary["sampling"]["seed"] == 5
    assert summary["sampling"]["stop_token_ids"] == [0]  # <|im_end|> from the tokenizer
    assert "launcher" in summary["sandbox"]
