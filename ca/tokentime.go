package ca

import (
	"fmt"
	"strings"
	"time"

	"go.step.sm/crypto/jose"
)

// tokenLeeway is how far the CA's clock may be past a token's exp (or before its
// nbf or iat) and still accept it.
//
// step-ca's JWK provisioner allows a minute (authority/provisioner/jwk.go,
// authorizeToken: ValidateWithLeeway(..., time.Minute)), the usual allowance for a
// token minted on one host and checked on another. Here there is no other host: the
// gateway mints the token (the admin command only asks it, over admin.sock) and the
// gateway checks it, so no admin workstation's clock is involved. What remains is a
// token minted by one gateway and presented to another sharing its database, whose
// clocks NTP keeps within milliseconds, and the whole-second precision of JWT times:
// exp is rounded down when the token is minted, and this second gives it back, so a
// token is valid at least --ttl after minting and less than a second more.
const tokenLeeway = time.Second

// MinTokenTTL is the shortest token validity MintToken accepts: token times are
// whole seconds, so a shorter one could not be honoured.
const MinTokenTTL = time.Second

// TokenTimeError is a one-time token refused because the CA's clock is outside its
// validity window: expired, or not valid yet. errors.Is matches ErrTokenExpired or
// ErrTokenNotYetValid.
type TokenTimeError struct {
	// Expired is true for a token past its exp (At), false for one whose nbf or iat
	// (At) is ahead of the CA's clock.
	Expired bool
	At      time.Time
	// Role and Name are what the token was minted for, for the command to mint another.
	Role Role
	Name string
}

// Error is the sentence a person reads: when, and the command that mints another.
func (e *TokenTimeError) Error() string {
	mint := "mint a new one with `wicket token create " + string(e.Role) + " " + e.Name + "`"
	if e.Role == "" || e.Name == "" {
		mint = "mint a new one with `wicket token create agent|user NAME`"
	}
	at := e.At.UTC().Format(time.RFC3339)
	if e.Expired {
		return ErrTokenExpired.Error() + " at " + at + "; " + mint
	}
	return ErrTokenNotYetValid.Error() + " (valid from " + at +
		" by this gateway's clock: is the clock of the gateway that minted it ahead?); " + mint
}

// Is makes errors.Is(err, ErrTokenExpired) (or ErrTokenNotYetValid) hold.
func (e *TokenTimeError) Is(target error) bool {
	if e.Expired {
		return target == ErrTokenExpired
	}
	return target == ErrTokenNotYetValid
}

// checkTokenTimes refuses a token whose validity window, widened by tokenLeeway,
// does not hold now. A token without exp is refused: every token we mint has one,
// and step-ca would accept one without it for ever.
func checkTokenTimes(c jose.Claims, now time.Time) error {
	role := roleOfProvisioner(c.Issuer)
	if c.Expiry == nil {
		return fmt.Errorf("%w: it has no expiry (exp)", ErrTokenInvalid)
	}
	if exp := c.Expiry.Time(); now.After(exp.Add(tokenLeeway)) {
		return &TokenTimeError{Expired: true, At: exp, Role: role, Name: c.Subject}
	}
	if nb := notBefore(c); now.Add(tokenLeeway).Before(nb) {
		return &TokenTimeError{At: nb, Role: role, Name: c.Subject}
	}
	return nil
}

// notBefore is the later of nbf and iat (a token is not valid before it was
// issued), the zero time if the token has neither.
func notBefore(c jose.Claims) time.Time {
	var t time.Time
	for _, d := range []*jose.NumericDate{c.NotBefore, c.IssuedAt} {
		if d != nil && d.Time().After(t) {
			t = d.Time()
		}
	}
	return t
}

// roleOfProvisioner is the role whose tokens the JWK provisioner named iss signs,
// "" if none.
func roleOfProvisioner(iss string) Role {
	for _, r := range []Role{RoleAgent, RoleUser, RoleGateway} {
		if provisionerName(r) == iss {
			return r
		}
	}
	return ""
}

// shortDuration prints 24h rather than 24h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
