"""The documentation runs: README.md and docs/*.md, their shell and Python
blocks executed as a reader would paste them.

Every ```bash / ```python block carries a marker in an HTML comment on the
line(s) right above it, so that no block is silently left untested:

  <!-- docs-test: run -->
      run exactly as written;
  <!-- docs-test: run, replacing `OLD` with `NEW`, `OLD2` with `NEW2` -->
      run with each OLD (which must occur in the block) replaced by NEW: the
      fast variant of a command that would take minutes, in plain sight;
  <!-- docs-test: skip, REASON -->
      shown only (it needs data, hardware or minutes the test does not have).

Each Markdown file runs top to bottom in its own scratch folder laid out like
the repository root (configs/, launch/, lsmtl_jax/ and notebooks/ linked in),
with HOME there too so the demo data cache starts empty: a reader following
that page from a clean clone. Shell blocks run under `bash -e -o pipefail`,
Python blocks under this interpreter, each in its own process. The files run
two at a time (they are independent), so the whole takes about a minute on 2
cores.

The other tests keep the pages honest without running anything: links and
anchors resolve, paths named in backticks exist, nothing refers to a file
outside the repository, the launchers the pages call directly are executable,
and the README keeps the two commands CI and new users rely on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
LINKED = ("configs", "launch", "lsmtl_jax", "notebooks")  # what the pages' commands read
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
BLOCK_TIMEOUT_S = 300
WORKERS = 2

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*docs-test:\s*(run|skip)\b(.*?)-->", re.S)
REPLACEMENT = re.compile(r"`([^`]*)`\s+with\s+`([^`]*)`")


@dataclasses.dataclass
class Block:
  doc: str
  line: int  # 1-based line of the opening fence
  language: str  # 'bash' or 'python'
  code: str
  marker: str | None  # 'run', 'skip' or None (unmarked)
  detail: str  # the marker's text after run/skip
  replacements: list[tuple[str, str]]

  @property
  def where(self) -> str:
    return f"{self.doc}:{self.line}"

  def runnable_code(self) -> str:
    code = self.code
    for old, new in self.replacements:
      if old not in code:
        raise AssertionError(f"{self.where}: the marker replaces `{old}`, which the block "
                             "does not contain")
      code = code.replace(old, new)
    return code


def read(doc: str) -> str:
  with open(os.path.join(REPO, doc), encoding="utf-8") as f:
    return f.read()


def blocks(doc: str) -> list[Block]:
  """Every fenced block of a runnable language, with the marker above it."""
  lines = read(doc).split("\n")
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    start, language = i, m.group(1).lower()
    i += 1
    while i < len(lines) and not lines[i].startswith("```"):
      i += 1
    code = "\n".join(lines[start + 1:i]) + "\n"
    i += 1
    if language not in RUN_LANGUAGES:
      continue
    # The marker: an HTML comment that ends on the line right above the fence.
    marker = detail = None
    replacements = []
    if start > 0 and lines[start - 1].rstrip().endswith("-->"):
      j = start - 1
      while j > 0 and "<!--" not in lines[j]:
        j -= 1
      m = MARKER.search("\n".join(lines[j:start]))
      if m:
        marker, detail = m.group(1), m.group(2).strip(" ,\n")
        if marker == "run" and detail:
          if not detail.startswith("replacing"):
            raise AssertionError(f"{doc}:{start + 1}: 'run' takes only "
                                 "'replacing `OLD` with `NEW`, ...'")
          replacements = REPLACEMENT.findall(detail)
          assert replacements, f"{doc}:{start + 1}: no `OLD` with `NEW` in {detail!r}"
    out.append(Block(doc, start + 1, RUN_LANGUAGES[language], code, marker, detail,
                     replacements))
  return out


# ----------------------------------------------------------------------------
# Running the pages
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
  block: Block
  returncode: int
  output: str
  seconds: float


def _sandbox(root: str) -> str:
  os.makedirs(os.path.join(root, "home"))
  for name in LINKED:
    os.symlink(os.path.join(REPO, name), os.path.join(root, name))
  return root


def _env(root: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update({
      "HOME": os.path.join(root, "home"),  # the demo data cache starts empty
      # matplotlib's font cache, built once for all pages rather than once per page
      "MPLCONFIGDIR": os.path.join(os.path.dirname(root), "matplotlib"),
      "JAX_PLATFORMS": "cpu",
      "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
      # `python` in a shell block is this interpreter (the test's environment).
      "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
      "MPLBACKEND": "Agg",
  })
  return env


def run_doc(doc: str, root: str) -> list[Outcome]:
  """Runs a page's 'run' blocks in order; stops at the first failure."""
  _sandbox(root)
  env = _env(root)
  outcomes = []
  for block in blocks(doc):
    if block.marker != "run":
      continue
    code = block.runnable_code()
    if block.language == "bash":
      cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
      cmd = [sys.executable, "-c", code]
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=BLOCK_TIMEOUT_S)
      returncode, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
      returncode = -1
      output = (e.stdout or "") if isinstance(e.stdout, str) else ""
      output += f"\n(timed out after {BLOCK_TIMEOUT_S} s)"
    outcomes.append(Outcome(block, returncode, output, time.perf_counter() - t0))
    if returncode != 0:
      break
  return outcomes


@pytest.fixture(scope="session")
def doc_runs(request, tmp_path_factory):
  """Runs the pages this session asked for, WORKERS at a time."""
  wanted = [item.callspec.params["doc"] for item in request.session.items
            if getattr(item, "originalname", "") == "test_doc_blocks_run"]
  wanted = [d for d in DOCS if d in wanted]
  base = tmp_path_factory.mktemp("docs")
  roots = {d: str(base / d.replace("/", "_").replace(".md", "")) for d in wanted}
  # The longest pages first, so that the two workers finish together.
  order = sorted(wanted, key=lambda d: -sum(b.marker == "run" for b in blocks(d)))
  pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
  yield {d: pool.submit(run_doc, d, roots[d]) for d in order}
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run(doc, doc_runs):
  outcomes = doc_runs[doc].result()
  for o in outcomes:
    assert o.returncode == 0, (
        f"{o.block.where}: the {o.block.language} block exited {o.returncode} after "
        f"{o.seconds:.1f} s\n--- code run ---\n{o.block.runnable_code()}--- output (end) ---\n"
        f"{o.output[-6000:]}")
  expected = sum(b.marker == "run" for b in blocks(doc))
  assert len(outcomes) == expected


# ----------------------------------------------------------------------------
# The pages without running them
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_marked_run_or_skip_with_a_reason(doc):
  for b in blocks(doc):
    assert b.marker in ("run", "skip"), (
        f"{b.where}: a {b.language} block without a '<!-- docs-test: run -->' or "
        "'<!-- docs-test: skip, REASON -->' comment right above it")
    if b.marker == "skip":
      assert b.detail, f"{b.where}: say why the block is not run"
    b.runnable_code()  # every replacement finds its text


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r"`", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(doc: str) -> set[str]:
  in_fence, out = False, set()
  for line in read(doc).split("\n"):
    if line.startswith("```"):
      in_fence = not in_fence
    elif not in_fence and line.startswith("#"):
      out.add(_anchor(line.lstrip("#")))
  return out


def _prose(doc: str) -> str:
  """The page without its fenced blocks."""
  return re.sub(r"^```.*?^```", "", read(doc), flags=re.S | re.M)


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_anchors_resolve_inside_the_repository(doc):
  for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
    if re.match(r"[a-z]+://", target):
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else (
        os.path.join(REPO, doc))
    assert resolved.startswith(REPO + os.sep), f"{doc}: link {target} leaves the repository"
    assert os.path.exists(resolved), f"{doc}: link {target}: no such file"
    if anchor:
      rel = os.path.relpath(resolved, REPO)
      assert anchor in _anchors(rel), f"{doc}: link {target}: no heading #{anchor} in {rel}"


@pytest.mark.parametrize("doc", DOCS)
def test_no_reference_to_files_outside_the_repository(doc):
  text = read(doc)
  for pattern in (r"\.\./(?:shared|seed|data|reference|bench)\b", r"SPEC\.md", r"/work/",
                  r"deep_lsmtl_paper"):
    hits = [l for l in text.split("\n") if re.search(pattern, l)]
    assert not hits, f"{doc} refers outside the repository ({pattern}): {hits[:3]}"


@pytest.mark.parametrize("doc", DOCS)
def test_paths_in_backticks_exist(doc):
  for path in re.findall(r"`((?:lsmtl_jax|configs|launch|tests|notebooks|docs)/[\w./*-]*)",
                         read(doc)):
    path = path.rstrip(".")
    if "*" in path or path.endswith("/"):
      path = os.path.dirname(path.rstrip("/")) if "*" in path else path
    assert os.path.exists(os.path.join(REPO, path)), f"{doc}: `{path}` does not exist"


def test_launchers_called_directly_are_executable():
  text = "\n".join(read(d) for d in DOCS)
  for name in sorted(set(re.findall(r"(?<![\w/])launch/([\w.-]+\.sh)\b", text))):
    mode = os.stat(os.path.join(REPO, "launch", name)).st_mode
    assert mode & stat.S_IXUSR, f"launch/{name} is called directly but is not executable"


def test_readme_keeps_the_install_commands():
  readme = read("README.md")
  for command in ("pip install -e . && python -m lsmtl_jax.main --config=configs/demo.py "
                  "--workdir=runs/demo",
                  "pip install -e '.[test]' && python -m pytest -n auto --dist loadfile"):
    assert f"\n{command}\n" in readme, f"README.md lost the command: {command}"
  assert len(readme.split("\n")) < 150, "README.md is the front door: keep it short"
