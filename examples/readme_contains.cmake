# Fails unless the file README holds the whole text of the file CODE (README's quick start).
file(READ ${README} readme)
file(READ ${CODE} code)
string(FIND "${readme}" "${code}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "${README} does not hold ${CODE} as it is: copy the file into README's quick start")
endif()
