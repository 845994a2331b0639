#!/usr/bin/env sh
# Fill each *.env.template in this folder into *.env, replacing every CHANGE_ME with a fresh random value.
# Existing *.env files are kept (re-running never rotates credentials under a running cluster).
# The values are hex (URL- and JSON-safe; S3 servers want >= 8 chars for keys): 19 chars for keys/users, 40 for
# secrets and passwords, 64 for tokens and signing keys.
set -eu
cd "$(dirname "$0")"
rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
for template in *.env.template; do
  target="${template%.template}"
  if [ -e "$target" ]; then
    echo "keep $target"
    continue
  fi
  tmp="$target.tmp.$$"
  umask 077
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      *=CHANGE_ME)
        key="${line%%=*}"
        case "$key" in
          *TOKEN*|*SECRET_KEY) value="$(rand 32)" ;;
          *PASSWORD*|*SECRET*) value="$(rand 20)" ;;
          *) value="idf$(rand 8)" ;;
        esac
        printf '%s=%s\n' "$key" "$value" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done < "$template" > "$tmp"
  mv "$tmp" "$target"
  echo "wrote $target"
done
