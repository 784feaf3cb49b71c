#!/usr/bin/env bash
# Review the recipes a pull request changes, for examples/github/recipes.yml (and for trying it locally):
# validate every changed recipe and preset, and write a pull-request comment with the semantic
# `recipe diff` of each changed recipe against the base commit ("new recipe" for an added one).
#
# It only parses YAML: `recipe validate` and `recipe diff` never import a recipe's `custom` condition
# code, and nothing here installs or runs code from the pull request.
#
# Environment (all optional):
#   BASE_SHA           the commit to compare with; default: pull_request.base.sha of $GITHUB_EVENT_PATH
#   HEAD_SHA           shown in the comment; default: pull_request.head.sha of $GITHUB_EVENT_PATH
#   RECIPES_DIR        where the recipes are (default: recipes)
#   COMMENT_FILE       the comment to write (default: comment.md); left empty when no recipe changed
#   RECIPE             the recipe-runner command (default: recipe)
#   PYTHON             a python3 to read the event payload and validate's JSON (default: python3)
# Run it anywhere in the repository; the working tree is the pull request's version (the checkout).
# Exit status: 0 when every changed file is valid, 1 otherwise (the comment is written either way; a
# diff that fails because the base version is broken is noted in it, and does not fail the review).
#
#   BASE_SHA=$(git merge-base origin/main HEAD) bash examples/github/review-recipes.sh && cat comment.md
set -uo pipefail

RECIPES_DIR=${RECIPES_DIR:-recipes}
COMMENT_FILE=${COMMENT_FILE:-comment.md}
RECIPE=${RECIPE:-recipe}
PYTHON=${PYTHON:-python3}
case "$COMMENT_FILE" in /*) ;; *) COMMENT_FILE="$PWD/$COMMENT_FILE" ;; esac
cd "$(git rev-parse --show-toplevel)" || exit 2
tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT

event_sha() {  # event_sha base|head: the pull request's commit from the event payload
  [[ -n "${GITHUB_EVENT_PATH:-}" ]] || return 0
  "$PYTHON" -c 'import json, sys
print(json.load(open(sys.argv[1]))["pull_request"][sys.argv[2]]["sha"])' "$GITHUB_EVENT_PATH" "$1"
}
BASE_SHA=${BASE_SHA:-$(event_sha base)}
HEAD_SHA=${HEAD_SHA:-$(event_sha head)}
if [[ -z "$BASE_SHA" ]]; then
  echo "review-recipes: set BASE_SHA, or GITHUB_EVENT_PATH to a pull_request event" >&2
  exit 2
fi
if ! git rev-parse --verify --quiet "$BASE_SHA^{commit}" >/dev/null; then
  echo "review-recipes: base commit $BASE_SHA is not in this clone (actions/checkout needs fetch-depth: 0)" >&2
  exit 2
fi

# Recipe files changed between the base and the working tree (the pull request's merge result).
changed=() removed=()
while IFS= read -r -d '' f; do
  case "$f" in *.yaml | *.yml) ;; *) continue ;; esac
  if [[ -e "$f" ]]; then changed+=("$f"); else removed+=("$f"); fi
done < <(git diff -z --name-only --no-renames "$BASE_SHA" -- "$RECIPES_DIR")
: > "$COMMENT_FILE"
if (( ${#changed[@]} + ${#removed[@]} == 0 )); then
  echo "review-recipes: no recipe changed under $RECIPES_DIR/"
  exit 0
fi

status=0
base_short=$(git rev-parse --short "$BASE_SHA")
{
  echo "## Recipe review"
  echo
  echo "Compared with the base commit \`$base_short\`${HEAD_SHA:+ (head \`${HEAD_SHA:0:7}\`)}."
  echo
} >> "$COMMENT_FILE"

# Validate everything at once; presets (base/ folders, `# recipe-runner: preset`) are checked as presets.
report=()
if (( ${#changed[@]} )); then
  "$RECIPE" validate "${changed[@]}" > "$tmp/validate.txt" 2>&1 || status=1
  cat "$tmp/validate.txt"
  "$RECIPE" validate --json "${changed[@]}" > "$tmp/validate.json" 2>/dev/null
  # One line per file: valid|invalid, recipe|preset, path.
  mapfile -t report < <("$PYTHON" -c 'import json, sys
for f in json.load(open(sys.argv[1]))["files"]:
    print("valid" if f["valid"] else "invalid", "preset" if f.get("preset") else "recipe", f["file"])' \
    "$tmp/validate.json")
  title=""
  if (( status )); then title="✗ Validation failed"; elif grep -q "warning:" "$tmp/validate.txt"; then
    title="Validation warnings"
  fi
  if [[ -n "$title" ]]; then
    { echo "### $title"; echo; echo '```text'; cat "$tmp/validate.txt"; echo '```'; echo; } >> "$COMMENT_FILE"
  fi
fi

for line in "${report[@]}"; do
  read -r validity kind f <<< "$line"
  if [[ "$kind" == preset ]]; then
    # A preset is no whole recipe, so it has no semantic diff: its text diff shows what changed. (The
    # diffs of the recipes extending it read it from the working tree, on both sides.)
    {
      if git cat-file -e "$BASE_SHA:$f" 2>/dev/null; then
        echo "### Preset \`$f\`: $validity as a preset"
        echo
        echo "Recipes that extend it change with it. What changed:"
        echo
        echo '```diff'
        git diff --no-color --no-ext-diff "$BASE_SHA" -- "$f" | sed -n '/^@@/,$p'
        echo '```'
      else
        echo "### Preset \`$f\`: new, $validity as a preset"
      fi
      echo
    } >> "$COMMENT_FILE"
  elif [[ "$validity" == valid ]]; then
    # The new version is valid, so a failure here is the base version's (or git's): say it, do not fail.
    if "$RECIPE" diff --git "$base_short" "$f" --format markdown > "$tmp/diff.md" 2> "$tmp/diff.err"; then
      if git cat-file -e "$BASE_SHA:$f" 2>/dev/null; then
        cat "$tmp/diff.md" >> "$COMMENT_FILE"
      else  # every resolved field of a new recipe: folded
        { echo "<details><summary>New recipe <code>$f</code>: every resolved field</summary>"; echo
          cat "$tmp/diff.md"; echo "</details>"; } >> "$COMMENT_FILE"
      fi
    else
      { echo "### \`$f\`: no diff (the base version does not load)"; echo; echo '```text'
        cat "$tmp/diff.err"; echo '```'; } >> "$COMMENT_FILE"
    fi
    echo >> "$COMMENT_FILE"
  else
    { echo "### \`$f\`: invalid (see above), no diff"; echo; } >> "$COMMENT_FILE"
  fi
done

for f in "${removed[@]}"; do
  { echo "### \`$f\`: removed"; echo; } >> "$COMMENT_FILE"
done
exit "$status"
