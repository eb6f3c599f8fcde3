// A C++ exception thrown through three probed frames (outer -> middle -> inner, which throws), caught
// by main; and one caught inside middle, with outer still above it. Prints what it computed.
//   throw N     N rounds of both; prints "caught A inner B" and the totals.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

__attribute__((noinline)) long inner(long x) {
    if (x % 2 == 0) throw std::runtime_error("even");
    return x * 3;
}

__attribute__((noinline)) long middle(long x, bool catch_here) {
    if (catch_here) {
        try {
            return inner(x) + 1;
        } catch (const std::runtime_error &) {
            return -1;
        }
    }
    return inner(x) + 1;
}

__attribute__((noinline)) long outer(long x, bool catch_here) { return middle(x, catch_here) + 10; }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    long caught = 0, sum = 0;
    for (long i = 0; i < n; i++) {
        try {
            sum += outer(i, false);
        } catch (const std::runtime_error &) {
            caught++;
        }
        sum += outer(i, true);
    }
    std::printf("caught %ld sum %ld\n", caught, sum);
    return 0;
}
