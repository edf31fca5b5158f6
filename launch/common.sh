# Shared by the launch scripts: `run` prints instead of executing under --dry_run.
DRY_RUN=0

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}
