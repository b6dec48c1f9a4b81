"""The task's sizes, in one low module that imports nothing: the dataset, the networks and the command lines (which
check an addend before torch's imports) read them from here."""

NUM_ADDENDS = 10  # addends 0..9 inclusive (the seed's randrange(0, 9) never drew 9)
NUM_SUMS = 19  # sums 0..18
