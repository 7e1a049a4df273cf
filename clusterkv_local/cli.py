"""Command-line interface: `clusterkv-local` and `python -m clusterkv_local`.

    clusterkv-local run "Once upon a time" -n 64          # stream a completion
    clusterkv-local run "Once upon a time" -ngl -1        # the whole model on the GPU (CUDA)
    clusterkv-local chat --system "Be brief."             # interactive chat, /exit to quit
    clusterkv-local info MODEL                            # metadata and tensor table of any GGUF
    clusterkv-local models                                # the registry, and what is cached
    clusterkv-local fetch qwen2.5-coder-0.5b-instruct     # download and verify a model
    clusterkv-local eval --quick                          # KV policies vs full KV (eval/)

MODEL is a registry name or a path to a GGUF file (default: the default registry model). Only
the public Llama API is used; the native library is loaded only by commands that need it.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from . import models


def _error(message: str) -> int:
    print("clusterkv-local: error: %s" % message, file=sys.stderr)
    return 1


def _model_file(name: Optional[str]) -> str:
    return models.resolve(name, fetch=True, progress=True)


def _load(args: argparse.Namespace, **kwargs: Any):
    path = _model_file(args.model)
    from .llama import Llama

    kv: Dict[str, Any] = {}
    if args.kv_policy:
        params = _kv_params(args.kv_param).get(args.kv_policy.lower(), {})
        kv = dict(kv_policy=args.kv_policy, kv_budget=args.kv_budget, kv_policy_params=params)
    elif args.kv_param or args.kv_budget is not None:
        raise ValueError("--kv-budget and --kv-param need --kv-policy")
    if getattr(args, "lookup", None) is not None:
        from .speculative import LlamaPromptLookupDecoding

        kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=args.lookup)
    llm = Llama(path, n_ctx=args.ctx, n_batch=args.batch_size, n_threads=args.threads,
                n_gpu_layers=args.n_gpu_layers, seed=args.seed, verbose=args.verbose,
                kv_offload=args.kv_offload, **kv, **kwargs)
    if getattr(args, "prompt_cache", None):
        from .cache import LlamaDiskCache

        llm.set_cache(LlamaDiskCache(args.prompt_cache))
    return llm


def _sampling(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, grammar=_grammar(args))


def _grammar(args: argparse.Namespace):
    """--grammar, --grammar-file or --json-schema (llama.cpp's flags) as a LlamaGrammar."""
    from .grammar import LlamaGrammar

    given = [a for a in ("grammar", "grammar_file", "json_schema") if getattr(args, a)]
    if len(given) > 1:
        raise ValueError("give only one of --grammar, --grammar-file and --json-schema")
    if args.grammar:
        return LlamaGrammar.from_string(args.grammar)
    if args.grammar_file:
        return LlamaGrammar.from_file(args.grammar_file)
    if args.json_schema:
        return LlamaGrammar.from_json_schema(args.json_schema)
    return None


def _print_speed(llm, elapsed: float) -> None:
    t = llm.timings()

    def rate(n: int, ms: float) -> str:
        return "%.1f tok/s" % (n / ms * 1e3) if ms > 0 else "n/a"

    print("\nprompt: %d tokens, %s | decode: %d tokens, %s | %.2f s"
          % (t["prompt_tokens"], rate(t["prompt_tokens"], t["prompt_ms"]), t["decode_tokens"],
             rate(t["decode_tokens"], t["decode_ms"]), elapsed), file=sys.stderr)
    if llm.kv_policy["policy"] != "full":
        kv, mem = llm.kv_stats(), llm.kv_memory()
        print("kv policy %s (budget %d): %d decode steps, density %s, %d clusters, %.1f ms clustering | "
              "KV bytes: GPU %.1f MiB, host %.1f MiB"
              % (llm.kv_policy["policy"], llm.kv_policy["budget"], kv["n_steps"],
                 "%.3f" % kv["density"] if kv["density"] is not None else "n/a", kv["n_clusters"],
                 kv["t_cluster_ms"], mem["device_kv"] / 2**20, mem["host_kv"] / 2**20), file=sys.stderr)
    # pip hides the build's output, so this is where a new user sees which backends were built.
    from ._internals import system_info

    print("runtime: %s" % system_info(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Streams a completion of the prompt to stdout; speeds go to stderr."""
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompt = f.read()
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        return _error("no prompt: give one as an argument, with -f FILE or on stdin")
    with _load(args) as llm:
        llm.reset_timings()
        start = time.perf_counter()
        for chunk in llm.create_completion(prompt, max_tokens=args.n_predict, stream=True,
                                           **_sampling(args)):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_speed(llm, time.perf_counter() - start)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat with the model's template; /exit (or EOF) quits, /reset forgets."""
    with _load(args) as llm:
        sampling = _sampling(args)  # the grammar (a file, a schema) is read once
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages: List[Dict[str, str]] = list(system)
        print("chatting with %s (%s template); /exit to quit, /reset to start over"
              % (os.path.basename(llm.model_path), llm.chat_format), file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                messages = list(system)
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for chunk in llm.create_chat_completion(messages, max_tokens=args.n_predict,
                                                    stream=True, **sampling):
                text = chunk["choices"][0]["delta"].get("content", "")
                reply.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeddings of texts (arguments, else one per line of stdin) as JSON lines on stdout:
    {"text", "embedding"} (pooled: one vector; pooling none: one per token)."""
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        return _error("no text: give some as arguments or on stdin, one per line")
    pooling = args.pooling if args.pooling is not None else -1
    with _load(args, embedding=True, pooling_type=pooling) as llm:
        for text in texts:
            vector = llm.embed(text, normalize=args.normalize)
            print(json.dumps({"text": text, "embedding": vector}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server (server.py) until interrupted."""
    from .server import Server

    with _load(args, embedding=args.embedding) as llm:
        server = Server(llm, host=args.host, port=args.port,
                        model_name=args.model_alias or os.path.basename(llm.model_path),
                        verbose=args.verbose)
        print("serving %s at %s/v1 (OpenAI API); Ctrl-C stops"
              % (server.model_name, server.url), file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.httpd.server_close()
    return 0


def _shorten(value: str, full: bool, width: int = 100) -> str:
    value = value.replace("\n", "\\n")
    return value if full or len(value) <= width else value[:width - 3] + "..."


def _support(path: str, n_gpu_layers: int) -> str:
    """Whether this runtime can run the model: a full (mmapped) load with a tiny context."""
    from .llama import Llama
    from ._internals import ClusterKVError

    try:
        with Llama(path, n_ctx=16, n_batch=16, n_gpu_layers=n_gpu_layers, verbose=False):
            return "yes"
    except ClusterKVError as e:
        return "no (%s)" % e


def cmd_info(args: argparse.Namespace) -> int:
    """Metadata, tensor table and type counts of any GGUF, and whether it is supported."""
    path = _model_file(args.model)
    from .llama import Llama
    from ._internals import system_info

    with Llama(path, metadata_only=True, verbose=False) as llm:
        metadata, tensors, info = llm.metadata, llm.tensors(), llm.model_info
    print("file: %s (%.1f MiB)" % (path, os.path.getsize(path) / 2**20))
    print("arch: %s | name: %s | %.1fM params in %d tensors, %.1f MiB of tensor data"
          % (info.arch, info.name, info.n_params / 1e6, len(tensors), info.size / 2**20))
    print("\nmetadata (%d keys):" % len(metadata))
    for key in sorted(metadata):
        print("  %-44s %s" % (key, _shorten(metadata[key], args.full)))
    if not args.no_tensors:
        print("\ntensors:")
        for t in tensors:
            print("  %-36s %-6s %-20s %10.2f MiB"
                  % (t.name, t.type_name, "x".join(map(str, t.shape)), t.size / 2**20))
    print("\ntensor types:")
    counts = Counter(t.type_name for t in tensors)
    sizes = Counter()
    for t in tensors:
        sizes[t.type_name] += t.size
    for type_name, n in counts.most_common():
        print("  %-6s %4d tensors %10.2f MiB" % (type_name, n, sizes[type_name] / 2**20))
    print("\nruntime: %s" % system_info())
    where = " (n_gpu_layers = %d)" % args.n_gpu_layers if args.n_gpu_layers else ""
    print("supported by this runtime%s: %s" % (where, _support(path, args.n_gpu_layers)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Lists the registry: name, size, architecture, whether cached, description."""
    print("cache: %s" % models.cache_dir())
    for m in models.list_models():
        print("%s %-30s %8.1f MB  %-7s %-7s %s" % (
            "*" if m["default"] else " ", m["name"], m["size"] / 1e6, m["arch"],
            "cached" if m["cached"] else "-", m["description"]))
    print("(* = default)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Downloads and verifies a registry model (once); prints its path."""
    print(models.model_path(args.name, progress=True))
    return 0


def _int_list(text: str) -> List[int]:
    """"2k,4096" -> [2048, 4096]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def _kv_params(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """["clusterkv.tokens_per_cluster=40", "n_sink=4"] -> {policy: {key: value}}; a key without
    a policy prefix applies to every policy that uses it."""
    from .llama import _KV_POLICY_KEYS, _KV_PARAM_KEYS, kv_param_from_text

    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError("--kv-param %r: expected [POLICY.]KEY=VALUE" % item)
        policy, _, key = name.rpartition(".")
        if key not in _KV_PARAM_KEYS:
            raise ValueError("--kv-param %r: unknown key %r; valid keys: %s"
                             % (item, key, ", ".join(_KV_PARAM_KEYS)))
        number = kv_param_from_text(key, value)
        targets = [policy] if policy else [p for p, keys in _KV_POLICY_KEYS.items() if key in keys]
        for target in targets:
            out.setdefault(target, {})[key] = number
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    """Passkey / NIAH / teacher-forced fidelity of each KV policy x budget; JSON, md, PNG."""
    from . import eval as kv_eval

    settings = kv_eval.EvalSettings(**kv_eval.QUICK) if args.quick else kv_eval.EvalSettings()
    settings.model = args.model
    settings.n_threads = args.threads
    settings.n_gpu_layers = args.n_gpu_layers
    for name in ("policies", "tasks"):
        if getattr(args, name):
            setattr(settings, name, tuple(x.strip() for x in getattr(args, name).split(",")))
    if args.budgets:
        settings.budgets = tuple(_int_list(args.budgets))
    if args.lengths:
        settings.lengths = tuple(_int_list(args.lengths))
    if args.depths:
        settings.depths = tuple(float(x) for x in args.depths.split(","))
    for name in ("tf_tokens", "prompt_format", "passkey_haystack", "passkey_repeat", "haystack",
                 "haystack_dir", "seed"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.f32_activations = args.f32_activations
    settings.kv_policy_params = _kv_params(args.kv_param)
    settings.extra_configs = tuple(args.extra)
    if args.h2o_lengths:
        settings.h2o_lengths = tuple(_int_list(args.h2o_lengths))
    out = args.out or "kv-eval-%s.json" % time.strftime("%Y%m%d-%H%M%S")
    if os.path.exists(out):
        return _error("%s exists; results are never overwritten" % out)
    result = kv_eval.run_eval(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    paths = kv_eval.write_report(result, out)
    print(kv_eval.markdown_report(result))
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def _add_gpu_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers on the GPU: 0 = CPU only (default), -1 = the whole model "
                   "(needs a CUDA build and device; see `info` for what this build has)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="registry name or GGUF path (default: %s)" % models.DEFAULT_MODEL)
    p.add_argument("-n", "--n-predict", type=int, default=256,
                   help="max tokens to generate (<= 0: until the context is full)")
    p.add_argument("-c", "--ctx", type=int, default=2048, help="context size in tokens")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="prompt tokens per forward pass (larger helps long prompts under --kv-offload)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    _add_gpu_arg(p)
    p.add_argument("--kv-policy", default=None,
                   help="which cached positions decode steps read: full (default), streaming, "
                   "quest, h2o, clusterkv")
    p.add_argument("--kv-budget", type=int, default=None, help="positions per head and step")
    p.add_argument("--kv-param", action="append", default=[], metavar="KEY=VALUE",
                   help="another kv_policy_params field, e.g. tokens_per_cluster=40")
    p.add_argument("--kv-offload", action="store_true",
                   help="GPU + clusterkv: keep the KV cache in host memory, the selected rows on "
                   "the GPU")
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=-1, help="-1: random")
    p.add_argument("--grammar", default=None, metavar="GBNF",
                   help="constrain the output to a GBNF grammar (llama.cpp's format)")
    p.add_argument("--grammar-file", default=None, metavar="FILE", help="the grammar from a file")
    p.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the output to JSON valid under this JSON Schema (its text)")
    p.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="speculative decoding by prompt lookup: check up to N guessed tokens per "
                        "forward pass (the same output; faster on repetitive text)")
    p.add_argument("--prompt-cache", default=None, metavar="DIR",
                   help="keep each completion's state in DIR; a later prompt that starts the same "
                        "evaluates only the rest (a LlamaDiskCache)")
    p.add_argument("--verbose", action="store_true", help="print the load summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterkv-local",
                                     description="Run GGUF language models locally.")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="complete a prompt, streaming to stdout")
    p.add_argument("prompt", nargs="?", help="prompt text (or -f FILE, or stdin)")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    _add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat using the model's chat template")
    p.add_argument("--system", default=None, help="system message")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embeddings of texts as JSON lines")
    p.add_argument("texts", nargs="*", help="texts (default: one per line of stdin)")
    p.add_argument("--pooling", choices=("none", "mean", "cls", "last"), default=None,
                   help="how a text's token vectors are pooled (default: the GGUF's, else none)")
    p.add_argument("--normalize", action="store_true", help="scale each vector to unit length")
    _add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--model-alias", default=None, help="the model name clients see")
    p.add_argument("--embedding", action="store_true", help="serve /v1/embeddings too")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="metadata and tensors of a GGUF file")
    p.add_argument("model", nargs="?", default=None, help="registry name or GGUF path")
    p.add_argument("--full", action="store_true", help="do not shorten long metadata values")
    p.add_argument("--no-tensors", action="store_true", help="omit the per-tensor table")
    _add_gpu_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("fetch", help="download and verify a registry model")
    p.add_argument("name", help="registry name (see `models`)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("eval", help="evaluate KV policies against the full KV cache")
    p.add_argument("-m", "--model", default=None,
                   help="registry name or GGUF path (default: %s)" % models.DEFAULT_MODEL)
    p.add_argument("--policies", help="comma list of full,streaming,quest,h2o,clusterkv")
    p.add_argument("--budgets", help="comma list of token budgets (default 256,512,1024,2048)")
    p.add_argument("--lengths", help="comma list of context lengths, e.g. 2k,4k")
    p.add_argument("--depths", help="comma list of needle depths in [0, 1]")
    p.add_argument("--tasks", help="comma list of passkey,niah,niah_multi,tf")
    p.add_argument("--tf-tokens", type=int, help="teacher-forced steps per length")
    p.add_argument("--prompt-format", choices=("completion", "chat"))
    p.add_argument("--passkey-haystack", choices=("filler", "essays"))
    p.add_argument("--passkey-repeat", type=int, help="copies of the passkey sentence (3)")
    p.add_argument("--haystack", choices=("auto", "pg_essays", "synthetic"))
    p.add_argument("--haystack-dir", help="a local copy of the Paul Graham essays (verified)")
    p.add_argument("--kv-param", action="append", default=[], metavar="[POLICY.]KEY=VALUE",
                   help="a kv_policy_params entry, e.g. clusterkv.tokens_per_cluster=40")
    p.add_argument("--extra", action="append", default=[], metavar="POLICY@BUDGET[:KEY=VALUE,..]",
                   help="one more row, e.g. clusterkv@1024:select_per_kv_head=1")
    p.add_argument("--h2o-lengths", help="h2o prefills each case itself: run it on these "
                   "lengths only (default: all)")
    p.add_argument("--seed", type=int, help="seeds the keys and values of the needles")
    p.add_argument("--f32-activations", action="store_true",
                   help="matmuls on f32 activations (no 8-bit rounding noise; slower)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    _add_gpu_arg(p)
    p.add_argument("--quick", action="store_true", help="a tiny run (CI smoke test)")
    p.add_argument("-o", "--out", help="JSON path (.md and .png beside it); default "
                   "kv-eval-<time>.json")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 runtime error, 2 usage error).

    Example:
        >>> main(["models"])
        0
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except KeyError as e:
        return _error(e.args[0] if e.args else str(e))
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        return _error(str(e))
