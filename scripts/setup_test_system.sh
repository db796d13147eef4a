#!/usr/bin/env bash
# System packages the tests use beyond pip: Debian's Chromium for the browser test of
# the Chainlit app (ch05/06_user_interface). Installed when we are root on Debian;
# elsewhere the browser test skips itself and says why.
set -u
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "Could not install chromium; the browser test will be skipped."
else
  echo "chromium not found and not root: the browser test will be skipped."
fi
exit 0
