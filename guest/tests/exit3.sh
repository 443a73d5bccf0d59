#!/bin/sh
# Runs inside the guest: exit status propagation check (run-uml.sh must exit 3).
echo "about to exit 3"
exit 3
