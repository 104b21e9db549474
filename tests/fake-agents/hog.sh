#!/bin/bash
# Grows to 512 MiB of resident memory in a child, as a test suite or a
# build that runs away does.
echo "run pid=$$" >> "${FAKE_LOG:-fake-runs.log}"
echo "allocating"
perl -e '$x = "x" x (512 * 1024 * 1024); print "allocated\n"'
echo "perl exited with $?"
exit 1
