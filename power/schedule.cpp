// power/schedule.cpp: (being written)
