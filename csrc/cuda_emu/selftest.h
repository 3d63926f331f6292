#pragma once
#include <string>
#include <vector>

namespace pe_emu_selftest {
// Runs the named rule-breaking kernel (selftest.cpp); returns its output.
std::vector<float> run(const std::string& name);
}  // namespace pe_emu_selftest
