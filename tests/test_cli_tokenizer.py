"End-to-end checks of the package as an installed, importable library (run in a fresh process)."
import subprocess, sys


def test_import_and_tokenize_in_fresh_process():
    code = ("from gpt2_demo.tokenizer import get_tokenizer as g; import sys; "
            "e = g('cl100k_base'); t = '你好，世界 hello 🚀'; assert e.decode(e.encode(t)) == t; print(len(e.encode(t)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0
