"""The lm-evaluation-harness adapter (``tiny_decoder.interop.harness``, the tool ``tiny_decoder.harness``) against
the project's own model: loglikelihood and is_greedy equal a direct log-softmax, batching changes nothing,
rolling loglikelihood equals the NLL of lm_eval's windows, generate_until equals the project's greedy decoding cut
at the stop strings, and ``evaluate ... harness_tasks=[lambada_shared]`` gives the project's own LAMBADA accuracy.

The language model is trained here, in seconds, on the last 33 tokens of every other one of the first passages
of the shared LAMBADA file, so that it gets about half of their last words right (an accuracy of 0 or 1 would
compare little).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import SHARED_DATA, run_tool
from tiny_decoder.data.tokenizer import train_bpe
from tiny_decoder.model import ModelConfig
from tiny_decoder.tasks.checkpoint import METADATA_KEY, metadata
from tiny_decoder.tasks.language_model import LanguageModel

LAMBADA = SHARED_DATA / "lambada" / "lambada_test.jsonl"
PASSAGES = 50
VOCAB = 400
CONTEXT = 32
STEPS = 150
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and more threads only wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def trained() -> LanguageModel:
    """A language model (prepend_eot) that learned the ends of the first LAMBADA passages."""
    if not LAMBADA.is_file():
        pytest.skip(f"shared LAMBADA file not found at {LAMBADA}")
    with LAMBADA.open(encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line, _ in zip(lines, range(PASSAGES), strict=False)]
    sizes = dict(d_model=48, n_layers=2, n_heads=2, d_ff=96)
    config = ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, bias=False, tie_embeddings=True, **sizes)
    torch.manual_seed(0)
    task = LanguageModel(config.to_dict(), prepend_eot=True)
    task.use_tokenizer(train_bpe(texts, VOCAB))
    ids = torch.tensor([task.encode_prompt(text)[-(CONTEXT + 1) :] for text in texts[::2]])  # every other one
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        loss = F.cross_entropy(task.model(ids[:, :-1]).transpose(1, 2), ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task.eval()


@pytest.fixture(scope="module")
def checkpoint(trained: LanguageModel, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("harness") / "lm.ckpt"
    state = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    torch.save({**state, METADATA_KEY: metadata(trained.task_name)}, path)
    return path


def adapter(task: LanguageModel, batch_size: int = 32):
    from tiny_decoder.harness import task_lm

    return task_lm(task, batch_size)


def requests(kind: str, *arguments: tuple):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def direct_score(task: LanguageModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log-softmax of the continuation and whether the argmax is each of its tokens, from one forward."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = task.model(ids[:, :-1]).log_softmax(dim=-1)[0, len(context) - 1 :]
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(dim=-1) == target).all())


PAIRS = [("Once upon a time", " there was a"), ("She looked at the", " door"), ("", "Hello there"), ("I ", "said")]


def test_loglikelihood_is_the_models_own_log_softmax(lm_eval, trained):
    results = adapter(trained).loglikelihood(requests("loglikelihood", *PAIRS))
    tokenizer, eot = trained.tokenizer, trained.eot_id
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results, strict=True):
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation  # lm_eval's move
        context_ids = trained.encode_prompt(context) if context else [eot]  # empty: lm_eval's prefix token
        continuation_ids = tokenizer.encode(continuation).ids
        expected, expected_greedy = direct_score(trained, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert greedy == expected_greedy


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(lm_eval, trained):
    context = trained.encode_prompt("He said that he would")
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(trained.model(torch.tensor([context + greedy])).argmax(dim=-1)[0, -1]))
    other = [*greedy[:2], (greedy[2] + 1) % VOCAB, greedy[3]]
    scored = adapter(trained)._loglikelihood_tokens([(("", ""), context, greedy), (("", ""), context, other)])
    assert [is_greedy for _, is_greedy in scored] == [True, False]


def test_batched_scores_equal_unbatched_ones(lm_eval, trained):
    texts = [" ".join(["word"] * n) for n in range(1, 12)] + ["Once upon a time there was a cat"] * 2
    pairs = [(text, " and then") for text in texts] + [(text, " the end of it all") for text in texts[:5]]
    one = adapter(trained, batch_size=1).loglikelihood(requests("loglikelihood", *pairs))
    batched = adapter(trained, batch_size=7).loglikelihood(requests("loglikelihood", *pairs))
    assert [greedy for _, greedy in one] == [greedy for _, greedy in batched]
    assert [logprob for logprob, _ in batched] == pytest.approx([logprob for logprob, _ in one], rel=1e-5, abs=1e-5)


def test_a_continuation_longer_than_the_context_is_scored_piece_by_piece(lm_eval, trained):
    """Each piece of at most the context's length is scored after the (left-truncated) text before it: the sum of
    their log-probabilities, greedy only when every piece is."""
    context = trained.encode_prompt("Once upon a time")
    continuation = trained.tokenizer.encode(" ".join(["the little dog ran to the park"] * 12)).ids
    assert len(continuation) > 3 * CONTEXT  # several pieces
    expected = 0.0
    for start in range(0, len(continuation), CONTEXT):
        piece = continuation[start : start + CONTEXT]
        window = (context + continuation[: start + len(piece)])[-(CONTEXT + 1) :]
        expected += direct_score(trained, window[: len(window) - len(piece)], piece)[0]
    (logprob, greedy), (short, _) = adapter(trained, batch_size=2)._loglikelihood_tokens(
        [(("", ""), context, continuation), (("", ""), context, continuation[:5])]
    )
    assert logprob == pytest.approx(expected, rel=1e-5)
    assert short == pytest.approx(direct_score(trained, context, continuation[:5])[0], rel=1e-5)


def test_rolling_loglikelihood_is_the_nll_of_the_text(lm_eval, trained):
    from lm_eval.utils import get_rolling_token_windows

    short = "She opened the door."
    long = " ".join(["She opened the door and looked at the garden."] * 12)  # several context windows
    tokens = {text: trained.tokenizer.encode(text).ids for text in (short, long)}
    assert len(tokens[short]) < CONTEXT < 2 * CONTEXT < len(tokens[long])
    results = adapter(trained, batch_size=3).loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,)))
    # a text that fits: the log-likelihood of all its tokens after <|endoftext|>
    assert results[0] == pytest.approx(direct_score(trained, [trained.eot_id], tokens[short])[0], rel=1e-5)
    # a longer one: each token predicted once, in lm_eval's windows of at most the model's context
    windows = list(get_rolling_token_windows(tokens[long], trained.eot_id, CONTEXT, 1))
    assert sum(len(predicted) for _, predicted in windows) == len(tokens[long])
    expected = sum(
        direct_score(trained, inputs[: len(inputs) - len(predicted) + 1], predicted)[0] for inputs, predicted in windows
    )
    assert results[1] == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_the_projects_greedy_generation_cut_at_the_stops(lm_eval, trained):
    prompts = ["Once upon a time", "She looked at the", "He said", "The dog"]
    assert len({len(trained.encode_prompt(prompt)) for prompt in prompts}) < len(prompts)  # some decoded together
    options = {"until": ["."], "max_gen_toks": 24}
    outputs = adapter(trained, batch_size=4).generate_until(
        requests("generate_until", *[(prompt, options) for prompt in prompts])
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == trained.continue_text(prompt, 24)[0].split(".")[0]
        assert "." not in output
    unstopped = requests("generate_until", ("He said", {"until": ["@@"], "max_gen_toks": 12}))
    assert adapter(trained).generate_until(unstopped) == trained.continue_text("He said", 12)


def test_evaluate_gives_the_projects_lambada_accuracy_through_the_harness(lm_eval, checkpoint, monkeypatch, tmp_path):
    """Same checkpoint, same first passages: the harness's lambada_openai definitions (context = text up to the last
    space, target = " " + the rest) and the project's (the last whitespace-separated word) agree on every passage
    whose last word follows a space -- all of these; 7 of the 5153 have a newline before it."""
    output = tmp_path / "results.json"
    args = [f"ckpt={checkpoint}", f"lambada={LAMBADA}", f"lambada_limit={PASSAGES}", f"output={output}"]
    assert run_tool(monkeypatch, "evaluate", *args, "harness_tasks=[lambada_shared]", f"harness_limit={PASSAGES}") == 0
    metrics = json.loads(output.read_text())["metrics"]
    assert metrics["lambada_shared/sample_len"] == metrics["lambada/passages"] == PASSAGES
    assert metrics["lambada_shared/acc"] == pytest.approx(metrics["lambada/acc"], abs=1e-6)
    assert 0.2 < metrics["lambada/acc"] < 0.9  # some right, some wrong: the comparison means something
    assert metrics["lambada_shared/perplexity"] == pytest.approx(metrics["lambada/word_ppl"], rel=1e-4)


def test_the_registered_model_loads_the_checkpoint_and_its_model_args_win(lm_eval, checkpoint, trained):
    from lm_eval.api.registry import get_model

    from tiny_decoder.harness import register

    register()
    assert get_model("dummy").__name__ == "DummyLM"  # lm_eval's own models are still there
    defaults = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm_eval's command line passes
    lm = get_model("tiny_decoder").create_from_arg_string(f"ckpt={checkpoint},batch_size=4,device=cpu", defaults)
    assert lm.batch_size == 4 and lm.device == torch.device("cpu") and lm.prepend_eot
    (logprob, _), *_ = lm.loglikelihood(requests("loglikelihood", PAIRS[0]))
    assert logprob == pytest.approx(adapter(trained).loglikelihood(requests("loglikelihood", PAIRS[0]))[0][0], rel=1e-6)


def test_the_command_line_adds_the_model_and_the_task_folder_unless_given(lm_eval):
    from tiny_decoder.harness import lm_eval_arguments
    from tiny_decoder.interop.harness import TASKS_DIR

    assert lm_eval_arguments(["--tasks", "lambada_shared"]) == [
        "--tasks", "lambada_shared", "--model", "tiny_decoder", "--include_path", str(TASKS_DIR),
        "--batch_size", "32", "--device", "cuda" if torch.cuda.is_available() else "cpu",
    ]  # fmt: skip
    given = ["--model=tiny_decoder", "--batch_size=4", "--device", "cpu", "--include_path", "mine"]
    assert lm_eval_arguments(given) == given
    assert lm_eval_arguments(["--model", "hf", "--include_path", "mine"]) == ["--model", "hf", "--include_path", "mine"]
    assert lm_eval_arguments(["ls", "tasks"]) == ["ls", "tasks", "--include_path", str(TASKS_DIR)]


@pytest.mark.parametrize("case", ["no lm_eval", "a sequence checkpoint"])
def test_evaluate_refuses_harness_tasks_in_one_line(case, checkpoint, monkeypatch, capsys):
    if case == "no lm_eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
        ckpt, expected = checkpoint, 'pip install -e ".[eval]"'
    else:
        pytest.importorskip("lm_eval")
        ckpt, expected = FIXTURES / "v1_sequence.ckpt", "need a language-model checkpoint"
    assert run_tool(monkeypatch, "evaluate", f"ckpt={ckpt}", "harness_tasks=[lambada_shared]") == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
