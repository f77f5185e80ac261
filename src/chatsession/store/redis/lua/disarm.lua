--! uses: clock index
-- Clear the mark of a finished create or fork.  ARGV: member, due.  Returns {0|1}
return {disarm(ARGV[2]) and 1 or 0}
