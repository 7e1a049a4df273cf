"""The command-line interface (clusterkv_local/cli.py), run as `python -m clusterkv_local`."""
import json
import os
import re
import shutil
import subprocess
import sys


from conftest import N_THREADS, require_native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, stdin=None, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "clusterkv_local", *args], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def test_models_lists_the_registry(tmp_path):
    result = cli("models", env={"CLUSTERKV_MODELS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cache: %s" % tmp_path
    smol = [ln for ln in lines if "smollm2-135m-instruct" in ln][0]
    assert smol.startswith("*") and "98.4 MB" in smol and "llama" in smol and "cached" not in smol
    assert any("qwen2.5-coder-1.5b-instruct" in ln for ln in lines)


def test_fetch_of_a_cached_model_prints_its_path(tmp_path, default_model_path):
    target = tmp_path / os.path.basename(default_model_path)
    try:
        os.link(default_model_path, target)
    except OSError:
        shutil.copyfile(default_model_path, target)
    result = cli("fetch", "smollm2-135m-instruct", env={"CLUSTERKV_MODELS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    assert (tmp_path / (target.name + ".sha256")).exists()  # hashed once, not downloaded


def test_unknown_model_name():
    result = cli("info", "no-such-model")
    assert result.returncode == 1
    assert "error" in result.stderr and "smollm2-135m-instruct" in result.stderr


def test_missing_file_is_an_error():
    result = cli("info", "/nonexistent/dir/model.gguf")
    assert result.returncode == 1
    assert "/nonexistent/dir/model.gguf" in result.stderr and "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exit_code():
    assert cli("run", "--bogus-flag").returncode == 2


def test_info(default_model_path):
    require_native()
    result = cli("info", default_model_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "arch: llama" in out
    assert "general.architecture" in out and "llama.block_count" in out
    assert "token_embd.weight" in out and "576x49152" in out
    types_section = out.split("tensor types:")[1]
    assert "210 tensors" in types_section and "61 tensors" in types_section
    assert "supported by this runtime: yes" in out


def test_run_streams_the_greedy_completion(default_model_path, llm):
    require_native()
    result = cli("run", "The capital of France is", "-m", default_model_path, "-n", "8",
                 "--temp", "0", "-c", "128", "-t", str(N_THREADS))
    assert result.returncode == 0, result.stderr
    expected = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert result.stdout == expected["choices"][0]["text"] + "\n"
    assert "tok/s" in result.stderr and "decode:" in result.stderr


def test_run_reads_prompt_file(default_model_path, tmp_path):
    require_native()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    result = cli("run", "-f", str(prompt), "-m", default_model_path, "-n", "3", "--temp", "0",
                 "-c", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_run_with_a_prompt_cache_evaluates_only_the_new_part(default_model_path, tmp_path):
    require_native()
    doc = "A ledger of the harbor town. " * 40
    cache = str(tmp_path / "states")
    common = ["-m", default_model_path, "-n", "4", "--temp", "0", "-c", "512",
              "-t", str(N_THREADS), "--prompt-cache", cache]
    first = cli("run", doc + "When did it open?", *common)
    second = cli("run", doc + "Who kept the ledger?", *common)
    plain = cli("run", doc + "Who kept the ledger?", *common[:-2])
    assert first.returncode == second.returncode == plain.returncode == 0, second.stderr
    prompt_tokens = [int(re.search(r"prompt: (\d+) tokens", r.stderr).group(1))
                     for r in (first, second, plain)]
    assert prompt_tokens[1] < 20 < prompt_tokens[0] and prompt_tokens[2] > 200
    assert second.stdout == plain.stdout
    assert len(os.listdir(cache)) == 2


def test_run_with_prompt_lookup_gives_the_same_text(default_model_path):
    require_native()
    prompt = "def area(w, h):\n    return w * h\n\n# again:\ndef area(w, h):\n"
    common = ["-m", default_model_path, "-n", "24", "--temp", "0", "-c", "256", "-t", str(N_THREADS)]
    plain, fast = cli("run", prompt, *common), cli("run", prompt, *common, "--lookup", "4")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert cli("run", prompt, *common, "--lookup", "0").returncode != 0   # must be >= 1


def test_run_with_a_grammar_or_a_json_schema(default_model_path, tmp_path):
    require_native()
    base = ("run", "A pet:", "-m", default_model_path, "-n", "40", "--temp", "0.7", "-c", "128",
            "--seed", "3")
    result = cli(*base, "--grammar", 'root ::= ("cat" | "dog") "!"')
    assert result.returncode == 0, result.stderr
    assert result.stdout in ("cat!\n", "dog!\n")
    gbnf = tmp_path / "pet.gbnf"
    gbnf.write_text('root ::= "fish" [0-9]\n', encoding="utf-8")
    result = cli(*base, "--grammar-file", str(gbnf))
    assert result.returncode == 0 and re.fullmatch(r"fish[0-9]\n", result.stdout), result.stderr
    schema = '{"type": "object", "properties": {"legs": {"type": "integer"}}, "required": ["legs"]}'
    result = cli(*base, "-j", schema)
    assert result.returncode == 0, result.stderr
    assert type(json.loads(result.stdout)["legs"]) is int
    result = cli(*base, "--grammar", 'root ::= "a', "-j", schema)
    assert result.returncode == 1 and "only one of" in result.stderr
    result = cli(*base, "--grammar", 'root ::= "a')
    assert result.returncode == 1 and "unterminated string literal" in result.stderr


def test_chat_session(default_model_path):
    require_native()
    result = cli("chat", "-m", default_model_path, "-n", "12", "--temp", "0", "-c", "512",
                 "--system", "Answer briefly.", stdin="Hello!\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.replace("> ", "").strip()


def test_run_with_a_kv_policy_reports_it(default_model_path):
    """--kv-policy / --kv-budget / --kv-param reach the Llama; stderr reports the policy's work;
    a bad name is an error naming the valid ones."""
    require_native()
    prompt = "Caches keep recently used data close to the processor. " * 12   # ~130 tokens
    result = cli("run", prompt, "-m", default_model_path, "-n", "6", "--temp", "0", "-c", "256",
                 "-t", str(N_THREADS), "--kv-policy", "clusterkv", "--kv-budget", "32",
                 "--kv-param", "tokens_per_cluster=20", "--kv-param", "recluster_interval=32",
                 "--kv-param", "kmeans_init=strided")
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("kv policy clusterkv (budget 32)")]
    assert line, result.stderr
    density = float(line[0].split("density ")[1].split(",")[0])
    assert 0 < density < 1
    bad = cli("run", "hi", "-m", default_model_path, "-n", "1", "-c", "64", "--kv-policy", "nope")
    assert bad.returncode == 1 and "clusterkv" in bad.stderr and "nope" in bad.stderr
    bad_init = cli("run", "hi", "-m", default_model_path, "-n", "1", "-c", "64", "--kv-policy", "clusterkv",
                   "--kv-param", "kmeans_init=kmeans++")
    assert bad_init.returncode == 1 and "random, strided" in bad_init.stderr
    orphan = cli("run", "hi", "-m", default_model_path, "-n", "1", "-c", "64", "--kv-budget", "8")
    assert orphan.returncode == 1 and "need --kv-policy" in orphan.stderr
    offload = cli("run", "hi", "-m", default_model_path, "-n", "1", "-c", "64", "--kv-policy",
                  "clusterkv", "--kv-offload")   # a GPU context's option, refused on the CPU
    assert offload.returncode == 1 and "kv_offload" in offload.stderr and "n_gpu_layers" in offload.stderr


def test_embed_prints_json_lines(default_model_path):
    require_native()
    from clusterkv_local import Llama

    result = cli("embed", "a cat", "a dog", "-m", default_model_path, "--pooling", "mean",
                 "--normalize", "-c", "64", "-t", str(N_THREADS))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with Llama(default_model_path, n_ctx=64, embedding=True, pooling_type="mean",
               verbose=False) as llm:
        want = llm.embed(["a cat", "a dog"], normalize=True)
    assert [r["text"] for r in rows] == ["a cat", "a dog"]
    assert [r["embedding"] for r in rows] == want
    piped = cli("embed", "-m", default_model_path, "--pooling", "mean", "-c", "64",
                stdin="a cat\n\na dog\n")
    assert [json.loads(line)["text"] for line in piped.stdout.splitlines()] == ["a cat", "a dog"]
