// power/schedule_test.cpp: (being written)
