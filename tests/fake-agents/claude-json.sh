#!/bin/bash
# Prints what `claude -p --output-format stream-json --verbose` prints: one
# JSON object per line, the last a result with its cost ($FAKE_COST, default
# 0.02 US dollars) and usage. Works by appending to the prompt file.
log=${FAKE_LOG:-./fake-runs.log}
echo "run iteration=$RALPH_QCHAT_ITERATION" >> "$log"
echo "progress $RALPH_QCHAT_ITERATION" >> "$RALPH_QCHAT_PROMPT_FILE"
cost=${FAKE_COST:-0.02}
echo '{"type":"system","subtype":"init","session_id":"s1","tools":["Bash"]}'
echo '{"type":"assistant","message":{"content":[{"type":"text","text":"Working on it."}]},"session_id":"s1"}'
printf '{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"num_turns":2,"result":"Done.","session_id":"s1","total_cost_usd":%s,"usage":{"input_tokens":100,"cache_creation_input_tokens":0,"cache_read_input_tokens":20,"output_tokens":30}}\n' "$cost"
