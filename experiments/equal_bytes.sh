# Sourced (after profile.sh) by the experiments that compare flat against crawlers at a fixed artifact size:
# crawler_vs_flat, crawler_power, crawler_power_confirm. The control is flat only; every arm fits the same
# binding SIZE_LIMIT with its own SDClip k (SIZE_TARGET=fit), and value embeddings go on every block
# (VE_LAYERS=all), so no arm gets a table the others lack. ABLATE_* are the arms' shapes (arms.tsv).
export SIZE_TARGET=fit VE_LAYERS=all CRAWLER_LOOPS=2
case "$PROFILE" in
  # pod: 6 flat x 640 (28.7M params) against the same crawlers; the cap binds at ~12 MB
  pod) export NUM_FLAT_LAYERS=6 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=12000000 ABLATE_FLAT=4 ABLATE_WIDE_DIM=720 ;;
  # cpu: 4 flat x 128 (the demo's depth); the cap binds at ~0.70 MB (every arm's k rises above 4)
  *) export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=700000 ABLATE_FLAT=2 ABLATE_WIDE_DIM=144 ;;
esac
