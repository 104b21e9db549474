#!/bin/bash
# A fork bomb in the small: starts 200 background processes as fast as it
# can, then waits for them. Each records itself in $PWD/bomb.pids.
echo "run pid=$$" >> "${FAKE_LOG:-fake-runs.log}"
for _ in $(seq 1 200); do
  sh -c "echo \$\$ >> '$PWD/bomb.pids'; exec sleep 60" 2>/dev/null &
done
echo "started what it could"
wait
