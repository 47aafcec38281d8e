# How the molecule experiments score a model (sourced by try_moses.sh):
# val and test (300 px), then test at 224 and 500 px, all at beam 3 with the encoder in fp32, one
# line per set appended to a TSV.
#   score_molecules NAME MODEL DATA_DIR SCORES_TSV
score_molecules() {
  local table
  for table in molecules.csv:val molecules.csv:test molecules_test_224.csv:test molecules_test_500.csv:test; do
    capcli evaluate --captions "$3/${table%:*}" --split "${table#*:}" -m "$2" -k 3 --device cpu --precision fp32 --json |
      python -c "import json, sys; d = json.load(sys.stdin); print('\t'.join(['$1', '$table'] + ['%s=%.4f' % kv for kv in d.items() if isinstance(kv[1], float)]))" >> "$4"
  done
}
